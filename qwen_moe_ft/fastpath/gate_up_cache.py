"""Each expert module's gate/up weight concatenation [E, 2I, H], kept between steps.

The fused gate/up projection multiplies by cat([w1, w3]) (expert_mlp.py). Without a cache every forward
builds that concatenation; with one, it is built once and then kept current by the one-pass optimizer
step, which writes each updated gate/up weight into it as it writes the bf16 weight (adamw.Mirror,
zero_step._fused_step). Its memory is the copies the forward would have kept for the backward anyway.

Guarded by tests/unit/fastpath/test_expert_mlp.py (a cache reused until the weights change through torch) and
test_zero_step.py (3 steps with the caches equal, bit for bit, 3 steps concatenating in each forward).
"""
from __future__ import annotations

import math

import torch

from .adamw import Mirror


class GateUpCache:
    """One expert module's gate and up weights concatenated ([E, 2I, H]).

    Valid while the weights are what it was built from: anything that writes them through torch (a
    checkpoint's load_state_dict) moves their version counters and makes the next forward rebuild it; an
    optimizer step that writes the weights outside torch must either write the cache too (mark_written)
    or invalidate it."""

    def __init__(self):
        self.weights: torch.Tensor | None = None
        self.builds = 0
        self._key = None

    @staticmethod
    def _key_of(w1: torch.Tensor, w3: torch.Tensor):
        return w1._version, w3._version, w1.data_ptr(), w3.data_ptr()

    def get(self, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        key = self._key_of(w1, w3)
        if self._key != key:
            shape = (w1.shape[0], w1.shape[1] + w3.shape[1], w1.shape[2])
            if self.weights is None or self.weights.shape != shape or self.weights.dtype != w1.dtype:
                self.weights = w1.new_empty(shape)
            with torch.no_grad():
                torch.cat([w1, w3], dim=1, out=self.weights)
            self._key = key
            self.builds += 1
        return self.weights

    def mark_written(self, w1: torch.Tensor, w3: torch.Tensor) -> None:
        """The optimizer wrote the new w1 and w3 into `weights` as well."""
        self._key = self._key_of(w1, w3)

    def invalidate(self) -> None:
        self._key = None


class GateUpCaches:
    """Every cached expert module's GateUpCache, and which half of which cache each gate/up weight is: what
    the one-pass step writes besides the weights."""

    def __init__(self):
        self.entries: list[tuple[GateUpCache, torch.Tensor, torch.Tensor]] = []
        self._targets: dict[int, tuple[GateUpCache, int]] = {}

    def add(self, cache: GateUpCache, w1: torch.Tensor, w3: torch.Tensor) -> None:
        self.entries.append((cache, w1, w3))
        self._targets[id(w1)], self._targets[id(w3)] = (cache, 0), (cache, 1)

    def covers_any(self, params) -> bool:
        return any(id(p) in self._targets for p in params)

    def mirrors(self, params: list, written: dict[GateUpCache, set[int]]) -> list[Mirror | None]:
        """The Mirror of each parameter's new weights (None: not a cached gate/up weight, or padding);
        `written` collects which halves of which cache they cover."""
        mirrors = []
        for param in params:
            cache, half = self._targets.get(id(param), (None, None)) if param is not None else (None, None)
            if cache is None or cache.weights is None:
                mirrors.append(None)
                continue
            mirrors.append(Mirror(cache.weights, half=half, block=math.prod(param.shape[1:])))
            written.setdefault(cache, set()).add(half)
        return mirrors

    def after_step(self, written: dict[GateUpCache, set[int]]) -> None:
        """Caches whose both halves the step wrote are current; the others (updated in part elsewhere, by
        another rank, then all-gathered) are rebuilt by their next forward."""
        for cache, w1, w3 in self.entries:
            if written.get(cache) == {0, 1}:
                cache.mark_written(w1, w3)
            else:
                cache.invalidate()

    def invalidate(self) -> None:
        """After the weights changed other than by the one-pass step (DeepSpeed's step, a checkpoint load)."""
        for cache, _, _ in self.entries:
            cache.invalidate()
