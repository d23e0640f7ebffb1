"""Where the GPU waited in a traced training step: its idle time split into forward and backward, and the host op
whose kernel each wait was for.

    python -m qwen_moe_ft.bench --full-length --stacks ours --trace-steps 3 --trace-export --out run.json
    python -m qwen_moe_ft.tools.trace_gaps run_ours_4L.trace.json.gz [--top 15] [--min-gap-us 5]

Reads a trace `bench --trace-export` wrote (Chrome trace format, torch.profiler's events). Each step runs from the
bench's begin mark to its forward_backward mark; the backward starts at the first GPU event launched from the thread
that runs autograd's backward nodes. A gap is time in which no kernel, copy or memset ran on any stream; it is
charged to the op (innermost, on the launching thread) whose launch ended it: the op the GPU was waiting for the
host to reach. Then where the host's time went in the forward: from the begin mark to the backward thread's first op,
the outermost ops on the marks' thread, each op's calls and host time (profiled: Python-heavy calls run slower).
"""
from __future__ import annotations

import gzip
import json
from bisect import bisect_right
from collections import defaultdict

from ..bench.harness import markdown_table, tool_parser

MARK = "qwen_moe_ft.bench.mark:"
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cuda_runtime", "cuda_driver")
BACKWARD_OP = "autograd::engine::evaluate_function"


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


class _Ops:
    """The CPU ops of each thread, to find the innermost one around a moment."""

    def __init__(self, events: list[dict]):
        self.by_thread: dict[object, list[dict]] = defaultdict(list)
        for e in events:
            if e.get("cat") == "cpu_op" and "dur" in e:
                self.by_thread[e["tid"]].append(e)
        for ops in self.by_thread.values():
            ops.sort(key=lambda e: e["ts"])
        self.starts = {tid: [e["ts"] for e in ops] for tid, ops in self.by_thread.items()}

    def innermost(self, tid, ts: float) -> str:
        ops = self.by_thread.get(tid, [])
        inside = [e for e in ops[:bisect_right(self.starts.get(tid, []), ts)] if e["ts"] + e["dur"] >= ts]
        return min(inside, key=lambda e: e["dur"])["name"] if inside else "(no op)"


def _step_windows(events: list[dict]) -> list[tuple[float, float, object]]:
    """(begin us, forward_backward mark us, the marks' thread) of each step: a begin mark followed by its
    forward_backward mark."""
    marks = sorted((e["ts"], e["name"][len(MARK):], e["tid"]) for e in events
                   if e.get("cat") == "user_annotation" and e["name"].startswith(MARK))
    return [(begin, end, tid) for (begin, name, tid), (end, next_name, _) in zip(marks, marks[1:])
            if name == "begin" and next_name == "forward_backward"]


def step_gaps(events: list[dict], min_gap_us: float = 5.0) -> tuple[list[dict], dict[str, list[float]]]:
    """Per step: wall, forward and backward ms with the GPU's idle ms in each; and over all steps, for each op the
    number of gaps charged to it and their total us."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in HOST_CATEGORIES and "correlation" in e.get("args", {})}
    backward_threads = {e["tid"] for e in events if e.get("cat") == "cpu_op" and e["name"].startswith(BACKWARD_OP)}
    ops = _Ops(events)
    steps, charged = [], defaultdict(lambda: [0, 0.0])
    for begin, end, _ in _step_windows(events):
        idle = {"forward": 0.0, "backward": 0.0}
        backward_from, reach = end, begin
        for g in (g for g in gpu if begin <= g["ts"] < end):
            launch = launches.get(g.get("args", {}).get("correlation"))
            if launch is not None and launch["tid"] in backward_threads:
                backward_from = min(backward_from, g["ts"])
            gap = g["ts"] - reach
            if gap >= min_gap_us:
                idle["forward" if g["ts"] < backward_from else "backward"] += gap
                op = ops.innermost(launch["tid"], launch["ts"]) if launch is not None else "(launch not traced)"
                charged[op][0] += 1
                charged[op][1] += gap
            reach = max(reach, g["ts"] + g["dur"])
        steps.append(dict(wall_ms=(end - begin) / 1e3, forward_ms=(backward_from - begin) / 1e3,
                          forward_idle_ms=idle["forward"] / 1e3, backward_ms=(end - backward_from) / 1e3,
                          backward_idle_ms=idle["backward"] / 1e3))
    return steps, dict(charged)


def forward_host_ops(events: list[dict]) -> tuple[list[dict], dict[str, list[float]]]:
    """Per step: the forward's host span (begin mark to the backward thread's first op) and the time in its
    outermost ops on the marks' thread; over all steps, each such op's calls and total us."""
    backward_starts = sorted(e["ts"] for e in events if e.get("cat") == "cpu_op" and e["name"].startswith(BACKWARD_OP))
    spans, by_op = [], defaultdict(lambda: [0, 0.0])
    for begin, end, tid in _step_windows(events):
        forward_end = next((ts for ts in backward_starts if begin <= ts < end), end)
        ops = sorted((e for e in events if e.get("cat") == "cpu_op" and e["tid"] == tid and "dur" in e
                      and begin <= e["ts"] < forward_end), key=lambda e: (e["ts"], -e["dur"]))
        covered, reach = 0.0, begin
        for e in ops:
            if e["ts"] >= reach:  # not inside the previous outermost op
                by_op[e["name"]][0] += 1
                by_op[e["name"]][1] += e["dur"]
                covered += e["dur"]
                reach = e["ts"] + e["dur"]
        spans.append(dict(host_ms=(forward_end - begin) / 1e3, in_ops_ms=covered / 1e3))
    return spans, dict(by_op)


def report(steps: list[dict], charged: dict[str, list[float]], top: int,
           host: tuple[list[dict], dict[str, list[float]]] = ([], {})) -> str:
    lines = [markdown_table(("step", "wall ms", "forward ms (GPU idle)", "backward ms (GPU idle)"),
                            ((i, f"{s['wall_ms']:.2f}", f"{s['forward_ms']:.2f} ({s['forward_idle_ms']:.2f})",
                              f"{s['backward_ms']:.2f} ({s['backward_idle_ms']:.2f})") for i, s in enumerate(steps))),
             "", f"GPU idle before the kernels of each op, all {len(steps)} steps (largest first):",
             markdown_table(("op", "gaps", "idle ms"), ((op, count, f"{us / 1e3:.2f}") for op, (count, us)
                                                         in sorted(charged.items(), key=lambda kv: -kv[1][1])[:top]))]
    spans, by_op = host
    if spans:
        lines += ["", "Host time of the forward (begin mark to the backward's first op), ms a step: "
                  + ", ".join(f"{s['host_ms']:.2f} ({s['in_ops_ms']:.2f} in ops)" for s in spans),
                  f"its outermost ops, all {len(spans)} steps (largest first):",
                  markdown_table(("op", "calls", "host ms", "us a call"),
                                 ((op, count, f"{us / 1e3:.2f}", f"{us / count:.1f}") for op, (count, us)
                                  in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.tools.trace_gaps", __doc__)
    parser.add_argument("trace", help="a trace written by bench --trace-export (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=15, help="ops to list")
    parser.add_argument("--min-gap-us", type=float, default=5.0, help="shorter gaps are not counted")
    args = parser.parse_args(argv)
    events = load(args.trace)
    steps, charged = step_gaps(events, args.min_gap_us)
    if not steps:
        raise SystemExit(f"{args.trace}: no step between a begin and a forward_backward mark; write traces with "
                         "`python -m qwen_moe_ft.bench --trace-steps N --trace-export`")
    print(report(steps, charged, args.top, forward_host_ops(events)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
