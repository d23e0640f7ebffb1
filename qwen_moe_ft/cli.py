"""The command line checked once, before any process starts: `python -m qwen_moe_ft.cli [options]` parses and
validates the options as train.py will (run.sh calls it ahead of the launcher) and says what is wrong in one
line, exit status 2. It imports nothing heavy, so `-h` and a typo answer at once."""
from __future__ import annotations

import os
import sys

from .config import ConfigError, TrainConfig, load_config
from .output_dir import check_output_dir


def preflight(argv: list[str] | None = None) -> TrainConfig:
    """The validated config, or ConfigError; touches no file."""
    cfg = load_config(argv).validate()
    check_output_dir(cfg)
    return cfg


def report(err: Exception):
    """An error a person reads once: printed by rank 0 only (every rank raises the same ones)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        preflight(argv)
    except ConfigError as err:
        report(err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
