"""DeepSpeed checkpoints that resume exactly, and that an interrupted save never spoils.

Layout: OUTPUT_DIR/checkpoints/step-N/ holds DeepSpeed's files (model, optimizer, scheduler; expert
shards per EP rank), our per-rank RNG states and, written last, a COMPLETE marker. The pointer file
`latest` is replaced atomically only after every rank has finished, so a crash mid-save leaves the
previous checkpoint as the one resumed from. The data position is the step: batches are planned
deterministically from (seed, epoch).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


def save(engine, root: Path, step: int, *, rank: int, keep: int) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the checkpoint and prunes old ones."""
    tag = f"step-{step}"
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of an interrupted save of this same step
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        (path / COMPLETE).write_text(f"{step}\n")
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / LATEST)
        prune(root, keep, latest=path)
    _barrier()
    return path


def prune(root: Path, keep: int, *, latest: Path):
    """Keep `latest` and the newest others, `keep` in all (0: all), and remove half-written saves. `latest` may have
    a lower step than the others (resumed from an earlier checkpoint): it is never the one removed."""
    others = [p for p in complete_checkpoints(root) if p != latest]
    for old in others[:max(len(others) - (keep - 1), 0)] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.iterdir():  # half-written saves of earlier, interrupted runs
        if _TAG.match(stray.name) and not (stray / COMPLETE).exists() and stray != latest:
            shutil.rmtree(stray, ignore_errors=True)


def resolve(resume: str, root: Path) -> Path:
    """The checkpoint directory that --resume names: `latest` or a path."""
    if resume == "latest":
        pointer = root / LATEST
        if not pointer.exists():
            raise CheckpointError(f"--resume latest: no finished checkpoint under {root}; "
                                  "train with --save-steps N first, or give a checkpoint path")
        path = root / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"--resume {resume}: {path} is not a finished checkpoint (no {COMPLETE} marker); "
                              f"finished ones: {[p.name for p in complete_checkpoints(path.parent)]}")
    return path


def load(engine, path: Path, *, rank: int) -> int:
    """Restore model, optimizer, scheduler and RNG; returns the number of steps already done. The fast path
    rebuilds what it keeps from the old weights (FastPath.after_load, called by the trainer)."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(client_state["step"])
