"""DeepSpeed checkpoints that resume exactly, and that an interrupted save never spoils.

Layout: OUTPUT_DIR/checkpoints/step-N/ holds DeepSpeed's files (model, optimizer, scheduler; expert
shards per EP rank), our per-rank RNG states and, written last, a COMPLETE marker (JSON: the step and the
layout it was saved with: processes, EP size, LoRA or not). The pointer file
`latest` is replaced atomically only after every rank has finished, so a crash mid-save leaves the
previous checkpoint as the one resumed from. The data position is the step: batches are planned
deterministically from (seed, epoch).

LoRA runs write, in place of DeepSpeed's files, one file per rank with its trainable weights (LoRA factors),
its ZeRO optimizer partition (fp32 master weights and moments) and the scheduler: DeepSpeed's AutoEP
checkpoint code reads the plain expert weights of each MoE block, which LoRA wraps, and the frozen base
needs no saving.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


class Layout(NamedTuple):
    """How a run is split: a checkpoint resumes only into the same (ZeRO partitions and expert shards are
    per rank)."""
    processes: int
    ep_size: int
    lora: bool

    def describe(self) -> str:
        return f"{self.processes} process(es) at EP={self.ep_size} ({'LoRA' if self.lora else 'full fine-tuning'})"


def saved_layout(path: Path) -> Layout | None:
    """The layout in a checkpoint's COMPLETE marker; None for markers written before it was recorded."""
    try:
        record = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return Layout(**record["layout"]) if isinstance(record, dict) and "layout" in record else None


def check_layout(path: Path, layout: Layout) -> None:
    """Stop before anything is loaded when `path` was saved with another layout, saying how to resume it."""
    saved = saved_layout(path)
    if saved is None or saved == layout:
        return
    raise CheckpointError(
        f"--resume: {path} was saved by {saved.describe()}; this run has {layout.describe()}. Resume it with "
        f"the same layout (NUM_PROCESSES={saved.processes} bash run.sh ..., or --nproc_per_node "
        f"{saved.processes}, with --ep-size {saved.ep_size}{' and --lora true' if saved.lora else ''}); "
        "resuming with another number of processes is not supported yet")


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


def _lora_file(path: Path, rank: int) -> Path:
    return path / f"lora_rank{rank}.pt"


def _save_lora(engine, path: Path, step: int, rank: int):
    trainable = {name: p.detach().cpu().clone() for name, p in engine.module.named_parameters() if p.requires_grad}
    torch.save({"step": step, "trainable": trainable, "optimizer": engine.optimizer.state_dict(),
                "scheduler": engine.lr_scheduler.state_dict(), "global_steps": engine.global_steps,
                "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps},
               _lora_file(path, rank))


def _load_lora(engine, path: Path, rank: int) -> int:
    file = _lora_file(path, rank)
    if not file.exists():
        raise CheckpointError(f"{path} holds no LoRA state for rank {rank} ({file.name}): it was written by a full "
                              "fine-tuning run or with another number of processes")
    state = torch.load(file, weights_only=False)
    params = dict(engine.module.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer = engine.optimizer
    # ZeRO reads only this rank's entry of the list; fp32 master weights come from it, not from the bf16 copies
    ranks = dist.get_world_size(optimizer.dp_process_group) if dist.is_initialized() else 1
    optimizer.load_state_dict([state["optimizer"]] * ranks, load_optimizer_states=True, load_from_fp32_weights=True)
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    return int(state["step"])


def save(engine, root: Path, step: int, *, rank: int, keep: int, layout: Layout) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the checkpoint and prunes old ones."""
    lora = layout.lora
    tag = f"step-{step}"
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of an interrupted save of this same step
    _barrier()
    if lora:
        if rank == 0:
            path.mkdir(parents=True)
        _barrier()
        _save_lora(engine, path, step, rank)
    else:
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        (path / COMPLETE).write_text(json.dumps({"step": step, "layout": layout._asdict()}) + "\n")
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


def load(engine, path: Path, *, rank: int, lora: bool = False) -> int:
    """Restore model, optimizer, scheduler and RNG; returns the number of steps already done. The fast path
    rebuilds what it keeps from the old weights (FastPath.after_load, called by the trainer)."""
    if lora:
        step = _load_lora(engine, path, rank)
    else:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        step = int(client_state["step"])
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return step
