"""Draw loss, tokens/s per GPU and MFU over steps: `python -m qwen_moe_ft.plot OUTPUT_DIR [--out FILE]`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Training-step records and eval records of a metrics.jsonl."""
    steps, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not JSON ({err.msg})") from None
        (evals if "eval_loss" in record else steps).append(record)
    return steps, evals


def plot(output_dir: str, out: str | None = None) -> Path:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the --output-dir of a training run")
    steps, evals = read_metrics(path)
    if not steps:
        raise ValueError(f"{path} holds no training steps yet")
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
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
