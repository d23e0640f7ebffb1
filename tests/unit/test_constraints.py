"""constraints-gpu.txt pins every package setup.cfg's [flash4] extra names, at the extra's own version."""
import configparser
import re

from helpers import REPO


def test_gpu_constraints_agree_with_the_flash4_extra():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extra = [line.strip() for line in setup["options.extras_require"]["flash4"].splitlines() if line.strip()]
    lines = (REPO / "constraints-gpu.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in pins)  # exact pins only
    for requirement in extra:
        name, version = requirement.split("==")
        assert pins[re.sub(r"\[.*\]", "", name)] == version, requirement
