"""Full fine-tuning at another layout: DeepSpeed's universal checkpoint (ds_to_universal), made once into step-N/universal
by the first resume that needs it, and loaded by the engine's universal path."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

from .files import _fsync_tree, _swap_in, _write_durably, barrier
from .layout import COMPLETE, FAILED, MOMENTS, SAVING, UNIVERSAL, CheckpointError, saved_layout

def _with_fp32_moments(path: Path, staging: Path) -> tuple[Path, bool]:
    """`path`, or where its moments are bf16 (the fast path's), `staging`: its files linked, the ZeRO optimizer
    files rewritten with the moments widened to fp32 (exactly), which DeepSpeed's AutoEP consolidation requires.
    One optimizer file in memory at a time: each holds a rank's whole partition (tens of GB at full size)."""
    widened = False
    for file in sorted(path.glob("*optim_states.pt")):
        sd = torch.load(file, map_location="cpu", weights_only=False)
        states = sd[OPTIMIZER_STATE_DICT][BASE_OPTIMIZER_STATE]["state"].values()
        if any(state[key].dtype != torch.float32 for state in states for key in MOMENTS):
            for state in states:
                state.update({key: state[key].float() for key in MOMENTS})
            staging.mkdir(exist_ok=True)
            torch.save(sd, staging / file.name)
            widened = True
        del sd, states
    if not widened:
        return path, False
    for file in path.glob("*.pt"):
        if not (staging / file.name).exists():
            (staging / file.name).symlink_to(file.resolve())
    return staging, True


def _convert_to_universal(path: Path) -> str:
    """Write `path`/universal with DeepSpeed's converter (a process of its own); returns what it ran."""
    target, part, staging = path / UNIVERSAL, path / (UNIVERSAL + SAVING), path / (UNIVERSAL + ".input")
    for leftover in (part, staging):
        shutil.rmtree(leftover, ignore_errors=True)
    start = time.perf_counter()
    source, widened = _with_fp32_moments(path, staging)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(part)]
    proc = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(staging, ignore_errors=True)
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's pointer beside its output: we name the tag
    ran = shlex.join(command)
    if proc.returncode:
        shutil.rmtree(part, ignore_errors=True)
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise CheckpointError(f"--resume: DeepSpeed's universal conversion of {path} failed ({ran}: "
                              f"{lines[-1] if lines else f'exit status {proc.returncode}'}). Resume it with the layout "
                              f"it was saved with ({saved_layout(path).relaunch()})")
    _fsync_tree(part)
    _write_durably(part / COMPLETE, json.dumps({"command": command}) + "\n")
    _swap_in(part, target)
    # the command as it would be run by hand: into the folder it ended in (written beside it, then renamed)
    by_hand = shlex.join(command[:-1] + [str(target)])
    if widened:
        by_hand += (f" (its input, {staging.name}, was {path.name} with the fast path's bf16 moments widened to fp32, "
                    "which the converter needs; removed after)")
    return (f"converted {path.name} once into DeepSpeed's universal checkpoint {path.name}/{UNIVERSAL} in "
            f"{time.perf_counter() - start:.0f} s: {by_hand}")


def universal(path: Path, *, rank: int) -> tuple[Path, str | None]:
    """`path`/universal, converted by rank 0 if it is not there yet (the others wait for it without a collective: a
    conversion outlasts a collective's timeout); a note of the conversion on rank 0. Collective."""
    target, failed = path / UNIVERSAL, path / (UNIVERSAL + FAILED)
    note = None
    if rank == 0 and not (target / COMPLETE).exists():
        failed.unlink(missing_ok=True)
        try:
            note = _convert_to_universal(path)
        except CheckpointError as err:
            _write_durably(failed, str(err))
            raise
    while not (target / COMPLETE).exists():
        if failed.exists():
            raise CheckpointError(failed.read_text())
        time.sleep(0.5)
    barrier()
    return target, note


def _load_universal(engine, path: Path, *, rank: int) -> tuple[int, str | None]:
    """Full fine-tuning at another layout: DeepSpeed's universal load (weights from the fp32 masters, each rank
    taking its experts and ZeRO partition) of step-N/universal."""
    target, note = universal(path, rank=rank)
    config = engine._config  # read by load_checkpoint alone: the engine itself was built for this run's layout
    config.load_universal_checkpoint = True
    try:
        _, client_state = engine.load_checkpoint(str(path), tag=target.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {target}")
    return int(client_state["step"]), note
