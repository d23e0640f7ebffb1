"""Draw loss, tokens/s per GPU and MFU over steps, and beside them the experts' load of the last step recorded
in expert_load.jsonl (layers x experts): `python -m qwen_moe_ft.plot OUTPUT_DIR [--out FILE]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .metrics import read_jsonl  # noqa: E402


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Training-step records and eval records of a metrics.jsonl (a torn last line, of a killed run, left out)."""
    records, _ = read_jsonl(path)
    return [r for r in records if "eval_loss" not in r], [r for r in records if "eval_loss" in r]


def last_expert_load(path: Path) -> tuple[int, list[list[int]]] | None:
    """(step, [layer][expert] token counts) of the last step in an expert_load.jsonl, or None without one."""
    if not path.is_file():
        return None
    rows, _ = read_jsonl(path)
    if not rows:
        return None
    step = rows[-1]["step"]
    last = sorted((r for r in rows if r["step"] == step), key=lambda r: r["layer"])
    return step, [r["tokens"] for r in last]


def _draw_load(ax, fig, step: int, load: list[list[int]]):
    # each layer over its mean, so layers of any token count share one colour scale (1: even)
    relative = [[c * len(row) / max(sum(row), 1) for c in row] for row in load]
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load at step {step} (tokens / layer mean)")
    fig.colorbar(image, ax=ax)


def plot(output_dir: str, out: str | None = None) -> Path:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the --output-dir of a training run")
    steps, evals = read_metrics(path)
    if not steps:
        raise ValueError(f"{path} holds no training steps yet")
    x = [r["step"] for r in steps]
    load = last_expert_load(Path(output_dir) / "expert_load.jsonl")
    fig = plt.figure(figsize=(15 if load else 8, 9))
    grid = fig.add_gridspec(3, 2 if load else 1)
    axes = [fig.add_subplot(grid[0, 0])]
    axes += [fig.add_subplot(grid[i, 0], sharex=axes[0]) for i in (1, 2)]
    if load:
        _draw_load(fig.add_subplot(grid[:, 1]), fig, *load)
    axes[0].plot(x, [r["loss"] for r in steps], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    axes[0].set_ylabel("loss per label token")
    axes[0].legend()
    axes[1].plot(x, [r["tps_per_gpu"] for r in steps])
    axes[1].set_ylabel("tokens / s / GPU")
    mfu = [r["mfu"] for r in steps]
    if any(m is not None for m in mfu):
        axes[2].plot(x, [100 * m if m is not None else float("nan") for m in mfu])
        axes[2].set_ylabel("MFU (%)")
    else:
        axes[2].plot(x, [r["tflops_per_gpu"] for r in steps])
        axes[2].set_ylabel("TFLOP/s / GPU (no MFU on CPU)")
    axes[2].set_xlabel("step")
    fig.suptitle(str(Path(output_dir).resolve().name))
    fig.tight_layout()
    target = Path(out) if out else Path(output_dir) / "metrics.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_moe_ft.plot", description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--out", help="PNG path (default OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        print(plot(args.output_dir, args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
