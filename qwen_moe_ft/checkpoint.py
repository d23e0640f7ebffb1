"""DeepSpeed checkpoints that resume exactly, and that an interrupted save never spoils.

Layout: OUTPUT_DIR/checkpoints/step-N/ holds DeepSpeed's files (model, optimizer, scheduler; expert
shards per EP rank), our per-rank RNG states and, written last, a COMPLETE marker (JSON: the step, the
layout it was saved with: processes, EP size, LoRA or not, and what decides its data order). A save is
written into step-N.saving, flushed to disk (every file, then the directory) and marked COMPLETE before
it is renamed to step-N; a step-N already there (a run resumed from an earlier checkpoint saves its steps
again) is renamed aside first and removed only after. The pointer file `latest` is replaced atomically
after that, so a crash at any point leaves `latest` naming a complete checkpoint: between the two renames
it resolves to step-N.saving.

The data position is the step: batches are planned deterministically from (seed, epoch), so a resume checks,
before any weight is loaded, that the options and the data that decide which examples a step trains on are
those the checkpoint was saved with (DataOrder).

LoRA runs write, in place of DeepSpeed's files, one file per rank with its trainable weights (LoRA factors),
its ZeRO optimizer partition (fp32 master weights and moments) and the scheduler: DeepSpeed's AutoEP
checkpoint code reads the plain expert weights of each MoE block, which LoRA wraps, and the frozen base
needs no saving.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
SAVING = ".saving"  # suffix of a save in progress
REPLACED = ".replaced"  # suffix of the earlier save of the same step, until the new one is in place
_TAG = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(rf"^step-\d+({re.escape(SAVING)}|{re.escape(REPLACED)})$")
# What decides which examples step N trains on, besides the number of processes (the Layout's): each epoch's
# micro-batch plan and the slice of it each step takes.
ORDER_OPTIONS = ("grad_accum", "max_tokens_per_batch", "packing", "seed", "shuffle_buffer")
# Options that move the order only through the examples they keep and their lengths in tokens: named when
# those changed.
DATA_OPTIONS = ("data", "eval_split", "max_seq_len", "truncation", "train_on_prompt")


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


class DataOrder(NamedTuple):
    """What decides which examples each step trains on: ORDER_OPTIONS and DATA_OPTIONS, and the examples as the
    planner sees them."""
    options: dict[str, Any]
    data: dict[str, Any]

    @classmethod
    def of(cls, options: dict[str, Any], lengths: Sequence[int]) -> "DataOrder":
        """`options` the run's options by flat name (TrainConfig.flat()); `lengths` the token length of every
        training example, in dataset order."""
        return cls({name: options[name] for name in ORDER_OPTIONS + DATA_OPTIONS},
                   data_fingerprint(options["data"], lengths))


def data_fingerprint(source: str, lengths: Sequence[int]) -> dict[str, Any]:
    """The files `source` names with their sizes (none for a hub dataset), the number of examples and a hash of
    their token lengths in order: the planner's whole input, so equal hashes plan equal batches."""
    path = Path(source).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return {"files": {str(p.resolve()): p.stat().st_size for p in files}, "rows": len(lengths),
            "lengths_sha256": hashlib.sha256(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()}


def _marker(path: Path) -> dict[str, Any]:
    """The record in a checkpoint's COMPLETE marker; empty for markers that hold only the step."""
    try:
        record = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def saved_layout(path: Path) -> Layout | None:
    """The layout in a checkpoint's COMPLETE marker; None for markers written before it was recorded."""
    record = _marker(path)
    return Layout(**record["layout"]) if "layout" in record else None


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


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _data_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """How the training examples differ, in the words a user can check: counts and file sizes."""
    parts = [f"{saved['rows']} examples then, {now['rows']} now"] if saved["rows"] != now["rows"] else []
    for file in sorted(set(saved["files"]) | set(now["files"])):
        then, size = saved["files"].get(file), now["files"].get(file)
        if then != size:
            parts.append(f"{file} {'absent' if then is None else f'{then} bytes'} then, "
                         f"{'absent' if size is None else f'{size} bytes'} now")
    return "; ".join(parts or ["the examples' lengths in tokens differ"])


def check_data_order(path: Path, order: DataOrder) -> str | None:
    """Stop before anything is loaded when `path` would resume into another data order (its steps would skip or
    repeat examples), naming what changed. A note for checkpoints saved before the order was recorded."""
    record = _marker(path)
    if "data_order" not in record:
        return (f"{path} was saved before checkpoints recorded their data order: nothing checks that "
                f"{', '.join(_flag(n) for n in ORDER_OPTIONS)}, --data and its tokenisation are those it was saved "
                "with (with others its steps train other examples)")
    saved = DataOrder(**record["data_order"])
    new_run = "or start a new run (another --output-dir, or --overwrite-output-dir true in place of --resume)"
    data_changed = (saved.data["rows"], saved.data["lengths_sha256"]) != (order.data["rows"],
                                                                           order.data["lengths_sha256"])
    # Data options that change no example's length leave the plan as it was: those resume.
    compared = ORDER_OPTIONS + (DATA_OPTIONS if data_changed else ())
    changed = [n for n in compared if n in saved.options and saved.options[n] != order.options[n]]
    step = f"step-{record.get('step', '?')}"
    if changed:
        was = "; ".join(f"{_flag(n)} was {_value(saved.options[n])} when {step} was saved, now "
                        f"{_value(order.options[n])}" for n in changed)
        again = " ".join(f"{_flag(n)} {_value(saved.options[n])}" for n in changed)
        raise CheckpointError(f"--resume: {was}: its steps would train other examples. Resume with {again}, "
                              f"{new_run}")
    if data_changed:
        raise CheckpointError(f"--resume: the training data is not the data {step} was saved with "
                              f"({_data_difference(saved.data, order.data)}): its steps would train other examples. "
                              f"Resume with the data it was saved with, {new_run}")
    return None


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


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)  # a directory too: its entries (new names) reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path):
    """Every file and directory under `path`, and `path` itself: what a COMPLETE marker vouches for is on disk."""
    for directory, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def _write_durably(path: Path, text: str):
    """`path` holds `text` or what it held before, whenever a crash comes: written beside, flushed, renamed over."""
    part = path.with_name(path.name + ".tmp")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    _fsync(path.parent)


def _finish_or_clear(root: Path, tag: str):
    """What an interrupted save of `tag` left: a complete save caught between its two renames is renamed into
    place (`latest` may resolve to it); the rest is removed."""
    path, saving = root / tag, root / (tag + SAVING)
    if not path.exists() and (saving / COMPLETE).exists():
        os.rename(saving, path)
        _fsync(root)
    for leftover in (saving, root / (tag + REPLACED)):
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_in(saving: Path, path: Path):
    """Rename the complete `saving` to `path`; an earlier `path` is renamed aside, and removed once replaced."""
    replaced = path.with_name(path.name + REPLACED)
    if path.exists():
        os.rename(path, replaced)
    os.rename(saving, path)
    _fsync(path.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def save(engine, root: Path, step: int, *, rank: int, keep: int, layout: Layout, data_order: DataOrder) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the checkpoint and prunes old ones."""
    tag = f"step-{step}"
    path, saving = root / tag, root / (tag + SAVING)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _finish_or_clear(root, tag)
    _barrier()
    if layout.lora:
        if rank == 0:
            saving.mkdir()
        _barrier()
        _save_lora(engine, saving, step, rank)
    else:
        engine.save_checkpoint(str(root), tag=saving.name, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), saving / f"rng_rank{rank}.pt")
    _fsync_tree(saving)  # on every rank: its own files are flushed from the host that wrote them
    _barrier()
    if rank == 0:
        record = {"step": step, "layout": layout._asdict(), "data_order": data_order._asdict()}
        _write_durably(saving / COMPLETE, json.dumps(record) + "\n")
        _swap_in(saving, path)
        _write_durably(root / LATEST, tag + "\n")
        prune(root, keep, latest=path)
    _barrier()
    return path


def prune(root: Path, keep: int, *, latest: Path):
    """Keep `latest` and the newest others, `keep` in all (0: all), and remove half-written saves. `latest` may have
    a lower step than the others (resumed from an earlier checkpoint): it is never the one removed."""
    others = [p for p in complete_checkpoints(root) if p != latest]
    for old in others[:max(len(others) - (keep - 1), 0)] if keep else []:
        (old / COMPLETE).unlink()  # first: a removal cut short leaves no directory that looks complete
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.iterdir():  # half-written saves of earlier, interrupted runs
        half_written = _TAG.match(stray.name) and not (stray / COMPLETE).exists()
        if (half_written or _LEFTOVER.match(stray.name)) and stray != latest:
            shutil.rmtree(stray, ignore_errors=True)


def resolve(resume: str, root: Path) -> Path:
    """The checkpoint directory that --resume names: `latest` or a path."""
    if resume == "latest":
        pointer = root / LATEST
        if not pointer.exists():
            raise CheckpointError(f"--resume latest: no finished checkpoint under {root}; "
                                  "train with --save-steps N first, or give a checkpoint path")
        path = root / pointer.read_text().strip()
        saving = path.with_name(path.name + SAVING)
        if not (path / COMPLETE).exists() and (saving / COMPLETE).exists():
            path = saving  # a save of the step `latest` names, stopped between its two renames
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
