"""Checkpoint directories written so that a crash at any moment leaves `latest` naming a complete one: every file
and directory flushed, COMPLETE written last, renames into place; and finding, pruning and resolving them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from .layout import _LEFTOVER, _TAG, COMPLETE, LATEST, REPLACED, SAVING, CheckpointError


def barrier():
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


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
