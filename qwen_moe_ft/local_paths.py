"""Whether a --model or --data value names a local path or something on the Hugging Face hub (org/name)."""
from __future__ import annotations

from pathlib import Path


def looks_local(name: str) -> bool:
    """A path, not a hub name (org/name): starts with . / ~, has several parts, or its first part is a local
    directory (`data/sft_typo` beside ./data); such a name that does not exist is reported missing, never fetched."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1
            or Path(name.split("/")[0]).is_dir())
