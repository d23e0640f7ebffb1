"""DeepSpeed checkpoints that resume exactly, at the layout they were saved with or another, and that an interrupted
save never spoils.

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
those the checkpoint was saved with (DataOrder). A step takes processes x --grad-accum micro-batches of the plan:
at another number of processes the same examples come next when that product is the same.

Another layout (number of processes, EP size): a full fine-tuning checkpoint resumes through DeepSpeed's universal
checkpoint (deepspeed.checkpoint.ds_to_universal: every parameter's fp32 master weight and Adam moments whole, the
experts consolidated over EP ranks), converted once into step-N/universal by the first such resume and loaded with
the engine's universal path; the fast path's bf16 moments are widened to fp32 for the conversion (its AutoEP
consolidation takes fp32 alone) and narrowed again after the load, and its gate/up mirror is rebuilt. The RNG
states are per rank, so they are restored at the same layout only (nothing a step draws depends on them).

LoRA runs write, in place of DeepSpeed's files, one file per rank with a layout-free share of the trainable
weights: each LoRA factor's fp32 master weight and Adam moments whole, an expert factor as the block of experts
this rank holds (ranks of EP group 0 write the experts, rank 0 the rest), with the scheduler. Any layout reads
them back: DeepSpeed's AutoEP checkpoint code reads the plain expert weights of each MoE block, which LoRA wraps,
and the frozen base needs no saving.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param
from deepspeed.utils import safe_set_full_optimizer_state

from .config import flag
from .model.lora import ExpertLoRA
from .parallel.expert_parallel import in_ep_group_of

COMPLETE = "COMPLETE"
LATEST = "latest"
SAVING = ".saving"  # suffix of a save in progress
REPLACED = ".replaced"  # suffix of the earlier save of the same step, until the new one is in place
UNIVERSAL = "universal"  # step-N/universal: DeepSpeed's universal checkpoint of step-N, made by the first resume
FAILED = ".failed"  # step-N/universal.failed: why the conversion stopped, for the ranks waiting on it
MOMENTS = ("exp_avg", "exp_avg_sq")
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
    """How a run is split: ZeRO partitions and expert shards are per rank, so a checkpoint resumes at another layout
    through a layout-free form (DeepSpeed's universal checkpoint, our LoRA slices)."""
    processes: int
    ep_size: int
    lora: bool
    sp_size: int = 1  # markers written before sequence parallelism hold no sp_size

    def describe(self) -> str:
        sp = f" SP={self.sp_size}" if self.sp_size > 1 else ""
        return (f"{self.processes} process(es) at EP={self.ep_size}{sp} "
                f"({'LoRA' if self.lora else 'full fine-tuning'})")

    def relaunch(self) -> str:
        sp = f" --sp-size {self.sp_size}" if self.sp_size > 1 else ""
        return (f"NUM_PROCESSES={self.processes} bash run.sh ..., or --nproc_per_node {self.processes}, with "
                f"--ep-size {self.ep_size}{sp}")


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


LORA_SLICES = "lora_slices_rank{}.pt"


def _lora_file(path: Path, rank: int) -> Path:
    return path / LORA_SLICES.format(rank)


def _lora_partition_file(path: Path, rank: int) -> Path:
    """Earlier versions' LoRA file: this rank's ZeRO partition, readable at the same layout only."""
    return path / f"lora_rank{rank}.pt"


def check_layout(path: Path, layout: Layout) -> None:
    """Stop before anything is loaded when `path` cannot resume at `layout`, saying how to resume it."""
    saved = saved_layout(path)
    if saved is None or saved == layout:
        return
    if saved.lora != layout.lora:
        raise CheckpointError(f"--resume: {path} was saved by {saved.describe()}; this run has {layout.describe()}. "
                              f"Resume it with{'' if saved.lora else 'out'} --lora true")
    if (saved.sp_size, saved.processes) != (layout.sp_size, layout.processes) and max(saved.sp_size,
                                                                                      layout.sp_size) > 1:
        # the rows' capacity and the data-parallel ranks that take the steps' micro-batches follow --sp-size
        raise CheckpointError(f"--resume: {path} was saved by {saved.describe()}; this run has {layout.describe()}, "
                              "and a resume at another number of processes or --sp-size with sequence parallelism is "
                              f"not supported yet. Resume it with {saved.relaunch()}")
    if saved.lora and not _lora_file(path, 0).exists():
        raise CheckpointError(
            f"--resume: {path} was saved by {saved.describe()} in the per-rank LoRA form of earlier versions, which "
            f"resumes at its own layout only; this run has {layout.describe()}. Resume it with "
            f"{saved.relaunch()}; its next save resumes at any layout")


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


def _step_size_error(step: str, saved: Layout, grad_accum: int, layout: Layout, now_accum: int) -> CheckpointError:
    """A resume at another number of processes whose steps take another number of micro-batches."""
    batch = saved.processes * grad_accum
    was = (f"--resume: {step} was saved by {saved.processes} process(es) with --grad-accum {grad_accum}, "
           f"{batch} micro-batches a step; {layout.processes} process(es) with --grad-accum {now_accum} take "
           f"{layout.processes * now_accum}: its steps would train other examples")
    if batch % layout.processes == 0:
        return CheckpointError(f"{was}. Resume with --grad-accum {batch // layout.processes} ({layout.processes} x "
                               f"{batch // layout.processes} = {batch}), or start a new run")
    fits = [n for n in range(1, batch + 1) if batch % n == 0]
    return CheckpointError(f"{was}, and no --grad-accum makes {batch} at {layout.processes} process(es). Resume at a "
                           f"number of processes dividing {batch} ({', '.join(map(str, fits))}) with --grad-accum "
                           f"{batch} / processes, or start a new run")


def check_data_order(path: Path, order: DataOrder, layout: Layout) -> str | None:
    """Stop before anything is loaded when `path` would resume into another data order (its steps would skip or
    repeat examples), naming what changed. At another number of processes, --grad-accum may change as long as a step
    takes as many micro-batches. A note for checkpoints saved before the order was recorded."""
    record = _marker(path)
    if "data_order" not in record:
        return (f"{path} was saved before checkpoints recorded their data order: nothing checks that "
                f"{', '.join(flag(n) for n in ORDER_OPTIONS)}, --data and its tokenisation are those it was saved "
                "with (with others its steps train other examples)")
    saved = DataOrder(**record["data_order"])
    saved_at = saved_layout(path) or layout
    new_run = "or start a new run (another --output-dir, or --overwrite-output-dir true in place of --resume)"
    data_changed = (saved.data["rows"], saved.data["lengths_sha256"]) != (order.data["rows"],
                                                                           order.data["lengths_sha256"])
    # Data options that change no example's length leave the plan as it was: those resume.
    compared = ORDER_OPTIONS + (DATA_OPTIONS if data_changed else ())
    if saved_at.processes != layout.processes:
        compared = tuple(n for n in compared if n != "grad_accum")
    changed = [n for n in compared if n in saved.options and saved.options[n] != order.options[n]]
    step = f"step-{record.get('step', '?')}"
    if changed:
        was = "; ".join(f"{flag(n)} was {_value(saved.options[n])} when {step} was saved, now "
                        f"{_value(order.options[n])}" for n in changed)
        again = " ".join(f"{flag(n)} {_value(saved.options[n])}" for n in changed)
        raise CheckpointError(f"--resume: {was}: its steps would train other examples. Resume with {again}, "
                              f"{new_run}")
    then, now = saved.options["grad_accum"], order.options["grad_accum"]
    if saved_at.processes * then != layout.processes * now:
        raise _step_size_error(step, saved_at, then, layout, now)
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


def _expert_layers(model) -> dict[str, Any]:
    """The name of each LoRA factor of this rank's experts -> its AutoEP layer."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoRA):
            layer = model.get_submodule(name.rpartition(".")[0])
            layers.update({f"{name}.{factor}": layer for factor, _ in module.named_parameters(recurse=False)})
    return layers


def _save_lora(engine, path: Path, step: int, rank: int):
    """This rank's layout-free share: every trainable weight's fp32 master and moments whole (an expert factor: this
    rank's experts), gathered over its data-parallel group; ranks of EP group 0 keep the expert factors, rank 0 the
    rest. Collective: every rank takes part in every parameter's gathers."""
    experts, slices = _expert_layers(engine.module), {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        values = {"fp32": safe_get_full_fp32_param(param),
                  **{key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}}
        layer = experts.get(name)
        if in_ep_group_of(layer, 0) if layer is not None else rank == 0:
            first = layer.ep_rank * layer.num_local_experts if layer is not None else None
            slices[name] = {"first_expert": first, **{k: v.to("cpu", copy=True) for k, v in values.items()}}
    adam = engine.optimizer.optimizer
    torch.save({"step": step, "slices": slices, "adam_step": float(next(iter(adam.state.values()))["step"]),
                "scheduler": engine.lr_scheduler.state_dict(), "global_steps": engine.global_steps,
                "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps},
               _lora_file(path, rank))


def _layout_free_value(path: Path, name: str, pieces: list[dict], key: str, param, layer) -> torch.Tensor:
    """`name`'s `key` at this rank's layout, from the pieces the saving ranks wrote."""
    if not pieces:
        raise CheckpointError(f"{path} holds no LoRA state of {name}: saved with other --lora-targets")
    if layer is None:
        value = pieces[0][key]
    else:
        first = layer.ep_rank * layer.num_local_experts
        whole = torch.cat([p[key] for p in sorted(pieces, key=lambda p: p["first_expert"])])
        value = whole[first:first + layer.num_local_experts]
    if value.shape != param.shape:
        raise CheckpointError(f"{path}: {name} was saved as {tuple(value.shape)}, this run's is {tuple(param.shape)} "
                              "(another --lora-rank?)")
    return value


def _legacy_lora_name(name: str) -> str:
    """`name` as LoRA checkpoints written under PEFT's attention wrappers named it (the model inside PEFT's
    `base_model.model.`, the attention factors under its adapter name `default`)."""
    for factor in ("lora_A", "lora_B"):
        name = name.replace(f".{factor}.weight", f".{factor}.default.weight")
    return "base_model.model." + name


def _load_lora(engine, path: Path) -> int:
    """The layout-free LoRA state into this rank's ZeRO partitions, at whatever layout this run has."""
    shares = {f: torch.load(f, weights_only=False) for f in path.glob(LORA_SLICES.format("*"))}
    pieces = defaultdict(list)
    for share in shares.values():
        for name, piece in share["slices"].items():
            pieces[name].append(piece)
    common = shares[_lora_file(path, 0)]
    optimizer, adam = engine.optimizer, engine.optimizer.optimizer
    # Adam's state for every flat partition, zero, through the optimizer's own load (its dtypes and devices); the
    # saved values go in below through DeepSpeed's per-parameter fragments
    template = adam.state_dict()
    template["state"] = {index: {"step": torch.tensor(common["adam_step"]), **{k: torch.zeros_like(master)
                                                                               for k in MOMENTS}}
                         for index, master in enumerate(p for group in adam.param_groups for p in group["params"])}
    adam.load_state_dict(template)
    optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter's fragments to the new state
    experts = _expert_layers(engine.module)
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            layer = experts.get(name)
            saved = pieces.get(name) or pieces.get(_legacy_lora_name(name), [])
            safe_set_full_fp32_param(param, _layout_free_value(path, name, saved, "fp32", param, layer))
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, _layout_free_value(path, name, saved, key, param, layer), key)
    optimizer.update_lp_params()  # the weights from the fp32 masters (collective)
    engine.lr_scheduler.load_state_dict(common["scheduler"])
    for group, lr in zip(adam.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps, engine.global_samples = common["global_steps"], common["global_samples"]
    engine.skipped_steps = common["skipped_steps"]
    return int(common["step"])


def _load_lora_partitions(engine, path: Path, rank: int) -> int:
    """A LoRA checkpoint of earlier versions (check_layout lets only its own layout through)."""
    state = torch.load(_lora_partition_file(path, rank), weights_only=False)
    params = {name: param for name, param in engine.module.named_parameters()}
    params.update({_legacy_lora_name(name): param for name, param in params.items()})
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
    return (f"converted {path.name} once into DeepSpeed's universal checkpoint {path.name}/{UNIVERSAL} in "
            f"{time.perf_counter() - start:.0f} s{' (bf16 moments widened to fp32 first)' if widened else ''}: {ran}")


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
    _barrier()
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
