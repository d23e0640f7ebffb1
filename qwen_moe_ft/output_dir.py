"""What a run leaves in OUTPUT_DIR, and the check that a fresh run does not mix into an earlier one's."""
from __future__ import annotations

import shutil
from pathlib import Path

from .config import ConfigError

# Everything a run writes into OUTPUT_DIR (trackers write under qwen_moe_ft/); nothing else there is touched.
RUN_OUTPUTS = ("metrics.jsonl", "expert_load.jsonl", "metrics.png", "checkpoints", "hf", "adapter", "qwen_moe_ft")


def earlier_run(output_dir: Path) -> list[str]:
    """The outputs of an earlier run found in `output_dir`."""
    return [name for name in RUN_OUTPUTS if (output_dir / name).exists()]


def check_output_dir(output_dir: str, *, resume: str, overwrite: bool):
    """Before anything is loaded: a fresh run (no `resume`, no `overwrite`) stops where it would append to (and
    prune) an earlier run's files."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file; give a directory")
    found = earlier_run(out)
    if found and not resume and not overwrite:
        raise ConfigError(f"--output-dir {out} holds an earlier run ({', '.join(found)}); continue it with "
                          "--resume latest, replace it with --overwrite-output-dir true, or pick another --output-dir")


def clear_earlier_run(output_dir: Path) -> list[str]:
    """Remove an earlier run's outputs (--overwrite-output-dir; rank 0 alone); returns what was removed."""
    found = earlier_run(output_dir)
    for name in found:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found
