"""What installing one patch did: applied, or refused with the reason."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Applied:
    name: str
    replaces: str  # the upstream symbols it stands in for
    refused: str = ""  # why it was not installed; empty when it was

    def __bool__(self) -> bool:
        return not self.refused

    def describe(self) -> str:
        return self.name if self else f"{self.name} (refused: {self.refused})"
