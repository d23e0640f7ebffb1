"""`python -m qwen_moe_ft.bench --runs N`: the benchmark repeated in one call and the runs set side by side.

The runs are interleaved (every stack and depth of run 1, then of run 2, ...), so that the machine drifting in the
meantime (clocks, another tenant) touches every stack alike. Each run is summarised on its own (summarise), and
the table gives, per stack, each run's per-layer time with its standard error and how far the runs spread, and per
baseline each run's ratio to ours and the lowest: "N of N runs at least R" is what a target in every run asks.
"""
from __future__ import annotations

from .harness import markdown_table


def spread(values: list[float]) -> float:
    """How far `values` spread, as a fraction of the smallest: (largest - smallest) / smallest."""
    return (max(values) - min(values)) / min(values)


def per_layer_cell(figures: dict, digits: int = 2) -> str:
    """A stack's per-layer ms (summarise's figures) with its standard error where it has one: "14.15 ±0.21"."""
    error = figures.get("per_layer_ms_standard_error")
    return f"{figures['per_layer_ms']:.{digits}f}" + (f" ±{error:.2f}" if error is not None else "")


def runs_table(per_run: list[dict], stacks: tuple[str, ...], baselines: tuple[str, ...],
               numbers: list[int] | None = None) -> str:
    """Each run's summary (summarise's output, one per run) side by side: per stack its per-layer ms where every
    run has one, else its tokens/s; per baseline its per-layer (else tokens/s) ratio to ours; the last column the
    runs' spread or the lowest ratio. `numbers`: each summary's run, counted from 1 (default 1, 2, ...), where a run
    in which nothing ran at every depth was left out."""
    rows = []
    for stack in stacks:
        runs = [summary.get(stack, {}) for summary in per_run]
        if runs and all("per_layer_ms" in r for r in runs):
            rows.append((f"{stack}: per layer ms", *map(per_layer_cell, runs),
                         f"spread {100 * spread([r['per_layer_ms'] for r in runs]):.1f}%"))
        elif runs and all("tokens_per_s" in r for r in runs):
            rows.append((f"{stack}: tokens/s", *(f"{r['tokens_per_s']:.0f}" for r in runs),
                         f"spread {100 * spread([r['tokens_per_s'] for r in runs]):.1f}%"))
    for baseline in baselines:
        ratios = [summary.get(f"ratios_{baseline}", {}) for summary in per_run]
        for key, what in (("per_layer_ms", "per layer"), ("tokens_per_s", "tokens/s")):
            if ratios and all(key in r for r in ratios):
                values = [r[key] for r in ratios]
                rows.append((f"{baseline} against ours: {what}", *(f"{v:.2f}x" for v in values),
                             f"lowest {min(values):.2f}x"))
                break
    if not rows:
        return ""
    header = ("", *(f"run {k}" for k in (numbers or range(1, len(per_run) + 1))), "")
    return f"{len(per_run)} runs, interleaved\n" + markdown_table(header, rows)
