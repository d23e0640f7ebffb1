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
    check_output_dir(cfg.output.dir, resume=cfg.checkpoint.resume, overwrite=cfg.output.overwrite)
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


def train() -> int:
    """`qwen-moe-ft-train`: the options checked before torch is imported, then the trainer in this process (one
    process, or each process of `torchrun --no-python qwen-moe-ft-train ...`)."""
    if main() != 0:
        return 2
    from .train import main as train_main

    return train_main()


if __name__ == "__main__":
    sys.exit(main())
