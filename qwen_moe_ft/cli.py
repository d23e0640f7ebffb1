"""The command line checked once, before any process starts: `python -m qwen_moe_ft.cli [options]` parses and
validates the options as train.py will, then reads the data as the trainer will (run.sh calls it ahead of the
launcher), and says what is wrong in one message, exit status 2. The options are checked before anything heavy
is imported, so `-h` and a typo answer at once."""
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


def _checked(argv: list[str] | None) -> TrainConfig | None:
    """preflight's config, or None once its ConfigError is reported."""
    try:
        return preflight(argv)
    except ConfigError as err:
        report(err)
        return None


def main(argv: list[str] | None = None) -> int:
    return 0 if _checked(argv) is not None else 2


def read_data(cfg: TrainConfig):
    """The rows of --data (and --eval-data) read, checked and tokenised as the trainer's _setup_data does; raises
    DataError naming the file and the rows. The tokenised rows land in datasets' cache, which the trainer then
    reads."""
    import datasets
    import torch

    from .data.rows import load_tokenized
    from .model.loading import load_tokenizer

    if not sys.stderr.isatty():  # a check that passes prints nothing, one that fails only its error
        datasets.disable_progress_bars()
    tokenizer = load_tokenizer(cfg.model, cfg.model.resolved(torch.cuda.is_available()))
    return load_tokenized(cfg.data, tokenizer, seed=cfg.optim.seed)


def check_sizes(cfg: TrainConfig, processes: int) -> None:
    """--ep-size and --sp-size against the number of processes the launch starts and the model, as the trainer
    checks them (parallel/sizes.py); raises ConfigError or ModelLoadError."""
    import torch

    from .model.loading import load_model_config
    from .parallel.sizes import check_sp_size, choose_ep_size

    model_config = load_model_config(cfg.model, cfg.model.resolved(torch.cuda.is_available()))
    choose_ep_size(cfg.parallel.ep_size, processes, model_config.num_experts)
    check_sp_size(cfg.parallel.sp_size, processes, model_config)


def check(argv: list[str] | None = None) -> int:
    """run.sh's check before its launcher: the options, the parallel sizes against WORLD_SIZE (the number of
    processes run.sh will start, where set), then the data, so that a mistake is one message and one exit status
    rather than an error in every process once they have started."""
    if (cfg := _checked(argv)) is None:
        return 2
    from .data.rows import DataError  # only now: the options' check above imports nothing heavy
    from .model.loading import ModelLoadError

    try:
        if processes := int(os.environ.get("WORLD_SIZE") or 0):
            check_sizes(cfg, processes)
        read_data(cfg)
    except (ConfigError, DataError, ModelLoadError) as err:
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
    sys.exit(check())
