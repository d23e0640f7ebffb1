"""What the measuring tools share: their command line, the refusal where there is no GPU, a GPU timer, markdown
tables, and the JSON report that names the GPU and the torch version behind its numbers."""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def tool_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`, its docstring as the description with the line breaks kept."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def require_cuda(tool: str) -> None:
    """Stops with one line where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        raise SystemExit(f"error: {tool} measures on a CUDA GPU, and there is none here")


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median GPU time of one call of fn in ms (CUDA events around each call), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[object]], with_header: bool = True) -> str:
    """A markdown table: the header and its rule (unless with_header is false, for rows printed as they come),
    then one line a row."""
    header = list(header)
    lines = [f"| {' | '.join(header)} |", "|" + " --- |" * len(header)] if with_header else []
    return "\n".join(lines + [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows])


def write_report(path: str | Path, **fields) -> None:
    """`fields` as JSON at `path`, after the GPU and the torch version that measured them."""
    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, **fields)
    Path(path).write_text(json.dumps(report, indent=1))


def _stream_name(stream: int, names: dict[int, str]) -> str:
    return names.get(stream, f"stream {stream:#x}")


def reserved_by_stream(segments: Iterable[dict], names: dict[int, str]) -> dict[str, dict[str, float]]:
    """GiB the caching allocator holds (segments' total_size) and has handed out (allocated_size), per CUDA stream,
    from torch.cuda.memory_snapshot()'s segments. The allocator reuses a freed block only for allocations on the
    stream it was allocated on, so memory reserved on a stream other than the step's is memory the step cannot use.
    names: stream handle -> name; the others are named by their handle."""
    by_stream: dict[str, dict[str, float]] = {}
    for segment in segments:
        name = _stream_name(segment["stream"], names)
        held = by_stream.setdefault(name, dict(reserved_gib=0.0, allocated_gib=0.0, segments=0))
        held["reserved_gib"] += segment["total_size"] / 2**30
        held["allocated_gib"] += segment["allocated_size"] / 2**30
        held["segments"] += 1
    return {name: {k: round(v, 3) for k, v in held.items()} for name, held in
            sorted(by_stream.items(), key=lambda item: -item[1]["reserved_gib"])}


def allocation_site(frames: list[dict]) -> str:
    """Where an allocation came from: the innermost Python frame outside torch, as path:line:function with the path
    from its package on (the frames innermost first, as torch.cuda.memory records them)."""
    for frame in frames:
        path = frame["filename"]
        if path.endswith(".py") and "/torch/" not in path:
            short = path.split("site-packages/")[-1] if "site-packages/" in path else "/".join(path.split("/")[-3:])
            return f"{short}:{frame['line']}:{frame['name']}"
    return "(no Python frame outside torch)"


def segment_growth(traces: Iterable[dict], names: dict[int, str], top: int = 8) -> dict[str, list[list]]:
    """Per stream, the allocation sites that made the caching allocator take new memory from the device (its
    segment_alloc events, with the frames of the allocation that asked for it, from
    torch.cuda.memory._snapshot()["device_traces"][device]): [site, GiB, segments], largest first, `top` of them.
    Memory given back (segment_free) is not subtracted: this is what grew each stream's pool."""
    grown: dict[str, dict[str, list]] = {}
    for entry in traces:
        if entry["action"] != "segment_alloc":
            continue
        stream = _stream_name(entry["stream"], names)
        site = grown.setdefault(stream, {}).setdefault(allocation_site(entry.get("frames", [])), [0.0, 0])
        site[0] += entry["size"] / 2**30
        site[1] += 1
    return {stream: [[site, round(gib, 3), count] for site, (gib, count) in
                     sorted(sites.items(), key=lambda item: -item[1][0])[:top]]
            for stream, sites in grown.items()}
