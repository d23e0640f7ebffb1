"""Per-step metrics: the log line, metrics.jsonl, Accelerate trackers and a progress bar (rank 0)."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .flops import flops_per_token

@dataclass
class StepMetrics:
    # Up to num_label_tokens: the line of the published Qwen3-MoE DeepSpeed runs, which scripts parse; ours follow.
    step: int
    epoch: int
    loss: float  # the LM loss per label token alone, comparable with and without the router terms
    grad_norm: float
    lr: float
    mem_gib: float | None
    tps: float
    tps_per_gpu: float
    num_label_tokens: int
    tflops_per_gpu: float
    mfu: float | None
    aux_loss: float  # load-balancing loss of the step (router.py)
    z_loss: float  # router z-loss of the step
    expert_load_max: float  # over layers, the busiest expert's token-slots over the mean
    dead_experts: int  # experts that got no token this step, summed over layers
    data_seconds: float  # building the step's batches, a part of the step's time
    # what the caching allocator held at the step's peak (allocations + blocks cached for reuse: the GPU memory the
    # process really takes), and the times it had to free its cache and retry a cudaMalloc (each synchronises)
    mem_reserved_gib: float | None = None
    alloc_retries: int | None = None

    def line(self) -> str:
        mem = "n/a" if self.mem_gib is None else f"{self.mem_gib:.2f} GiB"
        mfu = "n/a" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        reserved = "n/a" if self.mem_reserved_gib is None else f"{self.mem_reserved_gib:.2f} GiB"
        retries = "n/a" if self.alloc_retries is None else self.alloc_retries
        return (f"step {self.step} | epoch {self.epoch} | loss {self.loss:.4f} | grad_norm {self.grad_norm:.4f} | "
                f"lr {self.lr:.2e} | mem {mem} | tps {self.tps:.2f}({self.tps_per_gpu:.2f}/gpu) | "
                f"num_label_tokens {self.num_label_tokens} | tflops {self.tflops_per_gpu:.3g}/gpu | mfu {mfu} | "
                f"aux_loss {self.aux_loss:.4g} | z_loss {self.z_loss:.4g} | "
                f"expert_load_max {self.expert_load_max:.2f} | dead_experts {self.dead_experts} | "
                f"data {self.data_seconds:.3f} s | reserved {reserved} | alloc_retries {retries}")


KEYS = tuple(field.name for field in fields(StepMetrics))


class StepTimer:
    """Wall time of one optimizer step, with the current stream synchronised at both ends. Only that stream: the
    step's updates that run beside the next forward (fastpath/step_overlap.py) are counted in the step that
    waits for them, as a run without the timer would spend them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0
        self.marks: dict[str, float] = {}
        self._retries_before = 0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def begin(self):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._retries_before = self._retries()
        self.start = time.perf_counter()
        self.marks = {}

    def mark(self, name: str):
        """Seconds since begin() at this point (synchronised); the benchmark splits a step with these."""
        self._sync()
        self.marks[name] = time.perf_counter() - self.start

    def end(self) -> float:
        self._sync()
        return time.perf_counter() - self.start

    def peak_mem_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def peak_reserved_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_reserved(self.device) / 2**30

    def alloc_retries(self) -> int | None:
        """cudaMalloc retries since begin(): the allocator freed its cache to find room."""
        if self.device.type != "cuda":
            return None
        return self._retries() - self._retries_before

    def _retries(self) -> int:
        return torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)


def step_metrics(*, step: int, epoch: int, loss: float, grad_norm: float, lr: float, seconds: float,
                 data_seconds: float, tokens: int, label_tokens: int, mean_context: float, world_size: int,
                 model_config, peak_tflops: float | None, mem_gib: float | None, aux_loss: float, z_loss: float,
                 expert_load_max: float, dead_experts: int, frozen_weights: bool = False,
                 mem_reserved_gib: float | None = None, alloc_retries: int | None = None) -> StepMetrics:
    """Throughput counts real (unpadded) tokens of the global batch over the step's wall time: `seconds` from its
    batches on plus `data_seconds` building them, as the GPUs wait for both. frozen_weights (LoRA): the base
    weights get no weight gradient, which the FLOPs count leaves out."""
    tps = tokens / (data_seconds + seconds)
    per_gpu = tps / world_size
    tflops = per_gpu * flops_per_token(model_config, mean_context, frozen_weights) / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    return StepMetrics(step=step, epoch=epoch, loss=loss, grad_norm=grad_norm, lr=lr, mem_gib=mem_gib, tps=tps,
                       tps_per_gpu=per_gpu, num_label_tokens=label_tokens, tflops_per_gpu=tflops, mfu=mfu,
                       aux_loss=aux_loss, z_loss=z_loss, expert_load_max=expert_load_max,
                       dead_experts=dead_experts, data_seconds=data_seconds, mem_reserved_gib=mem_reserved_gib,
                       alloc_retries=alloc_retries)


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


ALLOC_RETRIES_TOLD = (
    "the CUDA caching allocator found no room {} time(s), freed its cache and retried (each retry synchronises "
    "the GPU; alloc_retries in the log counts them). Memory is tight: fewer tokens per micro-batch, more layers "
    "recomputed (python -m qwen_moe_ft.memory says how many), or, in full fine-tuning, --fast-path-skip with "
    "step_overlap added, which keeps far less cached (the memory CLI prints the option in full)")


class MetricsLogger:
    """Writes each logged step as a line, a JSON object in metrics.jsonl and to the trackers."""

    def __init__(self, output_dir: str, total_steps: int, accelerator, *, enabled: bool, progress_bar: bool):
        self.enabled = enabled
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.load_path = Path(output_dir) / "expert_load.jsonl"
        self.total_steps = total_steps
        # tqdm's redraws are for a terminal; in a log file they would join the step lines with carriage returns
        self.progress_bar = progress_bar and enabled and sys.stdout.isatty()
        self.bar = None
        self.file = None
        self.told_retries = False
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def start(self, step: int):
        """Open metrics.jsonl for appending and show progress from `step` (non-zero when resuming)."""
        if self.enabled:
            self.file = self.path.open("a")
        if self.progress_bar:
            self.bar = tqdm(total=self.total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)

    def _write(self, record: dict, line: str):
        self.file.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        self.info(line)

    def log_step(self, metrics: StepMetrics, log_line: bool):
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.loss:.4f}", tps_gpu=f"{metrics.tps_per_gpu:.0f}")
        if metrics.alloc_retries and not self.told_retries:  # once: the line's alloc_retries tells the rest
            self.told_retries = True
            self.info(f"warning: step {metrics.step}: {ALLOC_RETRIES_TOLD.format(metrics.alloc_retries)}")
        if not log_line:
            return
        self.accelerator.log({k: v for k, v in asdict(metrics).items() if v is not None and k != "step"},
                             step=metrics.step)
        if self.enabled:
            self._write(asdict(metrics), metrics.line())

    def log_eval(self, step: int, eval_loss: float, label_tokens: int):
        self.accelerator.log({"eval_loss": eval_loss}, step=step)
        if self.enabled:
            self._write({"step": step, "eval_loss": eval_loss, "eval_label_tokens": label_tokens},
                        f"eval step {step} | eval_loss {eval_loss:.4f} | label_tokens {label_tokens}")

    def log_expert_load(self, step: int, load: list[list[float]]):
        """A row per layer in expert_load.jsonl: the token-slots each expert got this step, over all ranks."""
        if not self.enabled:
            return
        with self.load_path.open("a") as file:
            for layer, counts in enumerate(load):
                file.write(json.dumps({"step": step, "layer": layer, "tokens": [int(c) for c in counts]}) + "\n")

    def info(self, message: str):
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self):
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a JSONL file, and the numbers of its lines that are not JSON (a process killed mid-write
    tears the last one)."""
    records, torn = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn.append(number)
    return records, torn


def drop_metrics_after(path: Path, step: int) -> str | None:
    """Forget records past `step`, training and eval ones: a resumed run logs those steps again. Lines that are not
    JSON are dropped too; returns a note saying so, or None."""
    if not path.exists():
        return None
    records, torn = read_jsonl(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return f"{path}: dropped line(s) {torn}, not JSON (written when the run was killed)" if torn else None
