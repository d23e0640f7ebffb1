"""The process environment a run needs, set in one place before Accelerate and DeepSpeed start."""
from __future__ import annotations

import os
import socket


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
