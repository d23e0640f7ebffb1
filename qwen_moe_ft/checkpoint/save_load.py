"""Saving a step and loading it back: DeepSpeed's engine state (or LoRA's layout-free shares), RNG states per rank,
the COMPLETE record; at another layout through DeepSpeed's universal checkpoint."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .files import _finish_or_clear, _fsync_tree, _swap_in, _write_durably, barrier, prune
from .layout import (COMPLETE, LATEST, SAVING, UNIVERSAL, CheckpointError, DataOrder, Layout, Schedule, _lora_file,
                     saved_layout)
from .lora_state import _load_lora, _load_lora_partitions, _save_lora
from .universal import _load_universal

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


def save(engine, root: Path, step: int, *, rank: int, keep: int, layout: Layout, data_order: DataOrder,
         schedule: Schedule) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the checkpoint and prunes old ones."""
    tag = f"step-{step}"
    path, saving = root / tag, root / (tag + SAVING)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _finish_or_clear(root, tag)
    barrier()
    if layout.lora:
        if rank == 0:
            saving.mkdir()
        barrier()
        _save_lora(engine, saving, step, rank)
    else:
        engine.save_checkpoint(str(root), tag=saving.name, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), saving / f"rng_rank{rank}.pt")
    _fsync_tree(saving)  # on every rank: its own files are flushed from the host that wrote them
    barrier()
    if rank == 0:
        record = {"step": step, "layout": layout._asdict(), "data_order": data_order._asdict(),
                  "schedule": schedule._asdict()}
        _write_durably(saving / COMPLETE, json.dumps(record) + "\n")
        _swap_in(saving, path)
        _write_durably(root / LATEST, tag + "\n")
        prune(root, keep, latest=path)
    barrier()
    return path


def load(engine, path: Path, *, rank: int, layout: Layout) -> tuple[int, str | None]:
    """Restore model, optimizer, scheduler and, at the same layout, RNG; returns the number of steps already done
    and, where the layout changed, a line saying how it was resumed. The fast path rebuilds what it keeps from the
    loaded state (FastPath.after_load, called by the trainer)."""
    saved = saved_layout(path) or layout
    note = None
    if layout.lora:
        step = _load_lora(engine, path) if _lora_file(path, 0).exists() else _load_lora_partitions(engine, path, rank)
    elif saved != layout:
        step, note = _load_universal(engine, path, rank=rank)
    else:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        step = int(client_state["step"])
    rng = path / f"rng_rank{rank}.pt"
    if saved == layout and rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    if saved != layout:
        how = "its LoRA slices" if layout.lora else f"DeepSpeed's universal checkpoint {path.name}/{UNIVERSAL}"
        note = "; ".join(filter(None, [note, f"{path.name} was saved by {saved.describe()}: resumed through {how}"]))
    return step, note
