"""The package versions the patches were written against and tested with; on others none is installed."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# Exact pins where the patches reach into private code: deepspeed (ZeRO-1/2 optimizer, AutoEP layers),
# transformers (Qwen3-MoE modules that liger swaps). torch: the private ops used (_grouped_mm,
# _foreach_norm) exist in this range. No patch touches PEFT's internals (LoRA is model/lora.py's own module).
WRITTEN_FOR = {"deepspeed": ("0.19.8",), "transformers": ("5.17.0",)}
TORCH_RANGE = ((2, 11), (2, 13))  # major.minor, inclusive


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def mismatches() -> list[str]:
    """'package found X, written for Y' for each package whose version the patches were not written for."""
    found = []
    for package, versions in WRITTEN_FOR.items():
        have = installed(package)
        if have not in versions:
            found.append(f"{package} {have or 'missing'} (written for {' or '.join(versions)})")
    torch_version = installed("torch") or "0.0"
    major_minor = tuple(int(part) for part in torch_version.split("+")[0].split(".")[:2])
    low, high = TORCH_RANGE
    if not low <= major_minor <= high:
        found.append(f"torch {torch_version} (written for {low[0]}.{low[1]} to {high[0]}.{high[1]})")
    return found
