"""Kernel tables for the benchmark: device time per kernel, split into forward+backward and optimizer.

A profiled step gets a marker event where StepTimer.mark("forward_backward") synchronised the
device; kernels that start before it are forward+backward, the rest the optimizer step. The
difference of two depths' tables, divided by the layer difference, is the per-layer table.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import record_function

from ..metrics import StepTimer
from .harness import markdown_table

MARK_PREFIX = "qwen_moe_ft.bench.mark:"
PHASES = ("forward_backward", "optimizer")


class MarkedTimer(StepTimer):
    """StepTimer whose begin and marks also appear in a torch.profiler trace."""

    def begin(self):
        super().begin()
        with record_function(MARK_PREFIX + "begin"):
            pass

    def mark(self, name: str):
        super().mark(name)
        with record_function(MARK_PREFIX + name):
            pass


def short_name(name: str, width: int) -> str:
    name = " ".join(name.split())
    return name if len(name) <= width else name[: width - 3] + "..."


# CPU events of the profiler's own bookkeeping that kernels can end up nested under; they are not where
# a kernel came from, and filing kernels under them split one op's time over two rows.
PROFILER_EVENTS = frozenset({"Activity Buffer Request"})
# CUDA runtime and driver calls (cudaStreamIsCapturing, cuLaunchKernel, ...): now and then the profiler hands a
# kernel to one of them as well as to the op that launched it (an H100 profile counted an LM-head GEMM twice, 6.2 ms);
# kernels are taken from ops only, and one that no op launched is filed as "(no op)" from the device's own events.
RUNTIME_CALL = re.compile(r"cu(da)?[A-Z]")


def _context(event) -> str:
    """Where a kernel came from: its launching op, under the backward node or outermost op around it."""
    chain, parent = [event.name], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    chain = [n for n in chain if n not in PROFILER_EVENTS] or ["(no op)"]
    backward = [n for n in chain if n.startswith("autograd::engine::evaluate_function: ")]
    outer = ("bwd " + backward[-1].split(": ", 1)[1]) if backward else chain[-1]
    return outer if outer == chain[0] else f"{outer} > {chain[0]}"


def phase_table(events, device_type: DeviceType = DeviceType.CUDA) -> dict[str, dict[str, float]]:
    """{"op > kernel": {forward_backward: us, optimizer: us, calls: n}} for one profiled step.

    On a GPU each kernel is filed under the op that launched it; on the CPU (tests) top-level aten ops
    are the rows.
    """
    marks = [e.time_range.start for e in events if e.name == MARK_PREFIX + "forward_backward"]
    if not marks:
        raise ValueError("no forward_backward mark in the profile: profile a step timed with MarkedTimer")
    split = marks[-1]
    table: dict[str, dict[str, float]] = defaultdict(lambda: {"forward_backward": 0.0, "optimizer": 0.0, "calls": 0})

    def phase(start):
        return "forward_backward" if start < split else "optimizer"

    def add(name, start, us):
        row = table[name]
        row[phase(start)] += us
        row["calls"] += 1

    if device_type == DeviceType.CPU:
        for e in events:
            if e.device_type == DeviceType.CPU and e.cpu_parent is None and e.name.startswith("aten::"):
                add(e.name, e.time_range.start, e.time_range.elapsed_us())
        return dict(table)
    # Kernels launched from an op are filed under it; the rest (extension and Triton launches outside an
    # aten op, such as DeepSpeed's FusedAdam) under "(no op)". Device events carry the device's own
    # start time, which lies before the mark for forward+backward: the mark waits for the device.
    unattributed: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.device_type == device_type and not getattr(e, "is_user_annotation", False):
            key = (short_name(e.name, 70), phase(e.time_range.start))
            unattributed[key][0] += e.time_range.elapsed_us()
            unattributed[key][1] += 1
    for e in events:
        if e.device_type != DeviceType.CPU or e.name.startswith(MARK_PREFIX) or RUNTIME_CALL.match(e.name):
            continue
        for kernel in e.kernels:
            name = short_name(kernel.name, 70)
            add(f"{short_name(_context(e), 70)} | {name}", e.time_range.start, kernel.duration)
            left = unattributed[(name, phase(e.time_range.start))]
            left[0] -= kernel.duration
            left[1] -= 1
    for (name, phase), (us, calls) in unattributed.items():
        if calls > 0 and us > 0:
            row = table[f"(no op) | {name}"]
            row[phase] += us
            row["calls"] += calls
    return dict(table)


def per_layer_table(low: dict, high: dict, span: int) -> list[dict]:
    """Per-layer device time of each kernel, (high - low) / span, largest total first."""
    rows = []
    for name in set(low) | set(high):
        a, b = low.get(name, {}), high.get(name, {})
        row = {"kernel": name}
        for key in (*PHASES, "calls"):
            row[key] = (b.get(key, 0.0) - a.get(key, 0.0)) / span
        row["total"] = row["forward_backward"] + row["optimizer"]
        rows.append(row)
    return sorted(rows, key=lambda r: -abs(r["total"]))


def format_per_layer(rows: list[dict], top: int = 25) -> str:
    total = {p: sum(r[p] for r in rows) for p in PHASES}
    return (f"per layer: forward+backward {total['forward_backward'] / 1e3:.2f} ms, "
            f"optimizer {total['optimizer'] / 1e3:.2f} ms of device time\n"
            + markdown_table(("kernel", "fwd+bwd us", "optimizer us", "calls"),
                             ((r["kernel"], f"{r['forward_backward']:.0f}", f"{r['optimizer']:.0f}", f"{r['calls']:.1f}")
                              for r in rows[:top])))


def _timed_work(events, device_type: DeviceType) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of each kernel (on the CPU: each top-level aten op)."""
    if device_type == DeviceType.CPU:
        chosen = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None
                  and e.name.startswith("aten::")]
    else:
        chosen = [e for e in events if e.device_type == device_type and not getattr(e, "is_user_annotation", False)]
    return sorted((e.time_range.start, e.time_range.end, short_name(e.name, 70)) for e in chosen)


def _union_us(intervals: list[tuple[float, float, str]]) -> float:
    busy, reach = 0.0, float("-inf")
    for start, end, _ in intervals:  # sorted by start
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def step_timelines(events, device_type: DeviceType = DeviceType.CUDA) -> list[dict]:
    """Each profiled step's forward+backward (from MarkedTimer's begin to its forward_backward mark): wall time,
    device time of its kernels summed over streams, and the time the device was busy (their union; wall - busy
    is time the device waited, e.g. on the host), all in ms; the number of kernels, and `kernels`: each kernel
    name's us."""
    begins = sorted(e.time_range.start for e in events if e.name == MARK_PREFIX + "begin")
    marks = sorted(e.time_range.start for e in events if e.name == MARK_PREFIX + "forward_backward")
    work = _timed_work(events, device_type)
    steps = []
    for begin, mark in zip(begins, marks):
        inside = [w for w in work if begin <= w[0] < mark]
        by_name: dict[str, float] = defaultdict(float)
        for start, end, name in inside:
            by_name[name] += end - start
        steps.append(dict(wall_ms=(mark - begin) / 1e3, kernels_ms=sum(by_name.values()) / 1e3,
                          busy_ms=_union_us(inside) / 1e3, launches=len(inside), kernels=dict(by_name)))
    return steps


def slowest_against_fastest(steps: list[dict], top: int = 8) -> dict:
    """Where the slowest forward+backward of several spent its extra time: wall, busy and kernel time against the
    fastest, and the kernels whose time differs most (us, slowest minus fastest)."""
    fast, slow = min(steps, key=lambda s: s["wall_ms"]), max(steps, key=lambda s: s["wall_ms"])
    names = set(fast["kernels"]) | set(slow["kernels"])
    diffs = sorted(((slow["kernels"].get(n, 0.0) - fast["kernels"].get(n, 0.0), n) for n in names), reverse=True)
    return dict({key: [round(fast[key], 2), round(slow[key], 2)] for key in ("wall_ms", "busy_ms", "kernels_ms")},
                kernels_us=[(n, round(d, 1)) for d, n in diffs[:top]])


def _profiled(device: str | torch.device):
    """The profiler, timer and event device type for a step that runs on `device`: the step's own device, not
    whether this machine has a GPU (a CPU step on a GPU machine launches no kernel to file its ops under)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    return profile(activities=activities), MarkedTimer(device), DeviceType.CUDA if cuda else DeviceType.CPU


def profile_steps(run_step, count: int, export: str | None = None, device: str | torch.device = "cuda"
                  ) -> list[dict]:
    """Profile `count` consecutive calls of run_step(timer, i) on `device` and return their step_timelines;
    `export`: also write the trace there (Chrome trace format, gzipped when the name ends in .gz) for a closer
    look."""
    profiler, timer, device_type = _profiled(device)
    with profiler as prof:
        for i in range(count):
            run_step(timer, i)
            timer.end()
    if export:
        prof.export_chrome_trace(export)
    return step_timelines(prof.events(), device_type)


def profile_step(run_step, device: str | torch.device = "cuda") -> dict[str, dict[str, float]]:
    """Profile one call of run_step(timer) on `device` and return its phase table."""
    profiler, timer, device_type = _profiled(device)
    with profiler as prof:
        run_step(timer)
        timer.end()
    return phase_table(prof.events(), device_type)
