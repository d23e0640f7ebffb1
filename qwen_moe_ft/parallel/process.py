"""The process environment a run needs, set in one place before Accelerate and DeepSpeed start: variables,
and the known-harmless messages of the libraries silenced."""
from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import warnings

# Warnings every run prints and none calls for action; each with why it is harmless.
HARMLESS_WARNINGS = (
    # DeepSpeed steps the LR scheduler after its own optimizer step, which torch's wrapper does not see;
    # the schedule is right (tests/unit/test_lr_schedule.py, and the lr column of every step line).
    (UserWarning, r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"),
    # DeepSpeed 0.19's ZeRO calls it; its replacement is torch's to adopt, nothing for a user to change.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
)
# Lines DeepSpeed prints (not logs) while starting its process group, once per rank.
HARMLESS_LINES = ("DeepSpeed deepspeed.ops.comm.",)


def ensure_process_env() -> None:
    """A plain `python train.py` (or a one-process `accelerate launch`) gets a one-rank process group:
    DeepSpeed and AutoEP need one even on a single GPU. Accelerate is told to run DeepSpeed on CPU
    processes too (it would otherwise only on GPUs)."""
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        os.environ.setdefault(key, value)


def silence_known_warnings(rank: int) -> None:
    """The harmless warnings never; any other once, by rank 0 (every rank would print the same one)."""
    if rank != 0:
        warnings.simplefilter("ignore")
        return
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def without_harmless_lines():
    """Stdout of the block, less the HARMLESS_LINES."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = captured.getvalue().splitlines(keepends=True)
        sys.stdout.write("".join(line for line in kept if not line.startswith(HARMLESS_LINES)))
