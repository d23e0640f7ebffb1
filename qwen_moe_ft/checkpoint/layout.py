"""What a checkpoint records about the run that saved it (COMPLETE: the step, the layout, the data order, the
schedule), and the checks a resume makes against it before any weight is loaded."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..config import flag

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
# What a resume takes from the checkpoint rather than from its options: AdamW's settings (torch's load_state_dict
# keeps the saved param groups') and the peak lr (the schedule's saved base_lrs). The schedule's shape is rebuilt
# from the options, so a new length, warmup or floor would move the lr mid-run.
SCHEDULE_OPTIONS = ("lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2",
                    "adam_eps")


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

    @property
    def data_ranks(self) -> int:
        """Ranks that take micro-batches of their own: one per SP group."""
        return self.processes // self.sp_size

    def describe_ranks(self) -> str:
        sp = f" at --sp-size {self.sp_size} ({self.data_ranks} data-parallel ranks)" if self.sp_size > 1 else ""
        return f"{self.processes} process(es){sp}"

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


class Schedule(NamedTuple):
    """The learning-rate schedule and AdamW settings a run steps with: SCHEDULE_OPTIONS and the number of steps the
    schedule spans (--max-steps, or the steps of --epochs)."""
    options: dict[str, Any]
    total_steps: int

    @classmethod
    def of(cls, options: dict[str, Any], total_steps: int) -> "Schedule":
        """`options` the run's options by flat name (TrainConfig.flat())."""
        return cls({name: options[name] for name in SCHEDULE_OPTIONS}, total_steps)


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
    if saved.lora and not _lora_file(path, 0).exists():
        raise CheckpointError(
            f"--resume: {path} was saved by {saved.describe()} in the per-rank LoRA form of earlier versions, which "
            f"resumes at its own layout only; this run has {layout.describe()}. Resume it with "
            f"{saved.relaunch()}; its next save resumes at any layout")


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _option_changes(names: list[str], then: dict[str, Any], now: dict[str, Any],
                    step: str) -> tuple[list[str], list[str]]:
    """For options that differ from a checkpoint's: what each was and is ("--x was A when step-N was saved, now B"),
    and the flags that resume as saved ("--x A")."""
    was = [f"{flag(n)} was {_value(then[n])} when {step} was saved, now {_value(now[n])}" for n in names]
    return was, [f"{flag(n)} {_value(then[n])}" for n in names]


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
    """A resume at another number of data-parallel ranks whose steps take another number of micro-batches."""
    batch, ranks = saved.data_ranks * grad_accum, layout.data_ranks
    was = (f"--resume: {step} was saved by {saved.describe_ranks()} with --grad-accum {grad_accum}, {batch} "
           f"micro-batches a step; {layout.describe_ranks()} with --grad-accum {now_accum} take {ranks * now_accum}: "
           "its steps would train other examples")
    if batch % ranks == 0:
        return CheckpointError(f"{was}. Resume with --grad-accum {batch // ranks} ({ranks} x {batch // ranks} = "
                               f"{batch}), or start a new run")
    fits = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
    # without SP a data-parallel rank is a process
    at, count, per = (("process(es)", "processes", "processes") if layout.sp_size == 1 else
                      ("data-parallel ranks", "data-parallel ranks (processes / --sp-size)", "ranks"))
    return CheckpointError(f"{was}, and no --grad-accum makes {batch} at {ranks} {at}. Resume at a number of {count} "
                           f"dividing {batch} ({fits}) with --grad-accum {batch} / {per}, or start a new run")


def _row_size_error(step: str, saved: Layout, saved_tokens: int, layout: Layout, now_tokens: int) -> CheckpointError:
    """A resume at another --sp-size whose packed rows (--max-tokens-per-batch x --sp-size) hold another number of
    tokens: the epochs would be planned into other rows."""
    row = saved_tokens * saved.sp_size
    was = (f"--resume: {step} packed rows of {row} tokens (--max-tokens-per-batch {saved_tokens} x --sp-size "
           f"{saved.sp_size}); this run's rows hold {now_tokens * layout.sp_size} (--max-tokens-per-batch {now_tokens} "
           f"x --sp-size {layout.sp_size}): its steps would train other examples")
    if row % layout.sp_size == 0:
        return CheckpointError(f"{was}. Resume with --max-tokens-per-batch {row // layout.sp_size}, or start a new run")
    return CheckpointError(f"{was}. Resume at an --sp-size dividing {row}, or start a new run")


def check_data_order(path: Path, order: DataOrder, layout: Layout) -> str | None:
    """Stop before anything is loaded when `path` would resume into another data order (its steps would skip or
    repeat examples), naming what changed. At another number of processes or --sp-size, --grad-accum may change as long
    as a step takes as many micro-batches, and --max-tokens-per-batch as long as a packed row (its tokens x --sp-size)
    holds as many tokens. A note for checkpoints saved before the order was recorded."""
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
    if (saved_at.processes, saved_at.sp_size) != (layout.processes, layout.sp_size):
        compared = tuple(n for n in compared if n != "grad_accum")  # checked as the micro-batches a step below
    if saved_at.sp_size != layout.sp_size:
        compared = tuple(n for n in compared if n != "max_tokens_per_batch")  # checked as the rows' size below
    changed = [n for n in compared if n in saved.options and saved.options[n] != order.options[n]]
    step = f"step-{record.get('step', '?')}"
    if changed:
        was, again = _option_changes(changed, saved.options, order.options, step)
        raise CheckpointError(f"--resume: {'; '.join(was)}: its steps would train other examples. Resume with "
                              f"{' '.join(again)}, {new_run}")
    then, now = saved.options.get("max_tokens_per_batch"), order.options["max_tokens_per_batch"]
    if then is not None and then * saved_at.sp_size != now * layout.sp_size:
        raise _row_size_error(step, saved_at, then, layout, now)
    then, now = saved.options["grad_accum"], order.options["grad_accum"]
    if saved_at.data_ranks * then != layout.data_ranks * now:
        raise _step_size_error(step, saved_at, then, layout, now)
    if data_changed:
        raise CheckpointError(f"--resume: the training data is not the data {step} was saved with "
                              f"({_data_difference(saved.data, order.data)}): its steps would train other examples. "
                              f"Resume with the data it was saved with, {new_run}")
    return None


def check_schedule(path: Path, schedule: Schedule) -> None:
    """Stop before anything is loaded when `path` was saved with another schedule or AdamW settings: a resume would
    keep the saved ones for some (lr, AdamW's) and take the new ones for others (the schedule's shape), so the
    options would silently do nothing or move the lr mid-run. Nothing to check for checkpoints saved before the
    schedule was recorded."""
    record = _marker(path)
    if "schedule" not in record:
        return
    saved = Schedule(**record["schedule"])
    cosine = "cosine" in (saved.options["lr_schedule"], schedule.options["lr_schedule"])
    compared = SCHEDULE_OPTIONS if cosine else tuple(n for n in SCHEDULE_OPTIONS if n != "min_lr_ratio")
    changed = [n for n in compared if saved.options[n] != schedule.options[n]]
    step = f"step-{record.get('step', '?')}"
    was, again = _option_changes(changed, saved.options, schedule.options, step)
    if cosine and saved.total_steps != schedule.total_steps:
        was.append(f"its cosine schedule spanned {saved.total_steps} steps, now {schedule.total_steps} "
                   "(--max-steps, or --epochs)")
        again.append(f"--max-steps {saved.total_steps}")
    if was:
        raise CheckpointError(f"--resume: {'; '.join(was)}: a resume continues the learning-rate schedule and AdamW "
                              f"state {step} holds, which these would change mid-run. Resume with {' '.join(again)}, "
                              "or start a new run from its weights (--model OUTPUT_DIR/hf, another --output-dir)")
