"""Each expert module's gate/up weight concatenation [E, 2I, H], kept between steps.

The fused gate/up projection multiplies by cat([w1, w3]) (expert_mlp.py). Without a cache every forward
builds that concatenation; with one, it is built once and then kept current by the one-pass optimizer
step, which writes each updated gate/up weight into it as it writes the bf16 weight (adamw.Mirror,
zero_step._fused_step). Its memory is the copies the forward would have kept for the backward anyway.

Where the masters are kept as low bits (master_bits.py), the step may write the new gate/up weights into the
concatenation only (hold_weights; adamw.Mirror.holds_weight): the parameters w1 and w3 then lag behind it until
write_back copies them over, which ZeroState.settle does before any other reader (a checkpoint, an export, DeepSpeed's
own step or load, its save_checkpoint: zero_step.hold_gate_up_weights_in_caches) and each expert module's state_dict
pre-hook does before its state_dict.

Guarded by tests/unit/fastpath/test_zero_step.py (3 steps with the caches equal, bit for bit, 3 steps concatenating
in each forward; with the weights held in the caches, the same after a write-back, a save and a skipped step).
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
        self.holds_weights = False  # the last step wrote the new w1 and w3 here only
        self._key = None

    @staticmethod
    def _key_of(w1: torch.Tensor, w3: torch.Tensor):
        return w1._version, w3._version, w1.data_ptr(), w3.data_ptr()

    def get(self, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        key = self._key_of(w1, w3)
        if self._key != key:
            # w1 and w3 were written through torch (a load) since: they are the weights now
            self.holds_weights = False
            shape = (w1.shape[0], w1.shape[1] + w3.shape[1], w1.shape[2])
            if self.weights is None or self.weights.shape != shape or self.weights.dtype != w1.dtype:
                self.weights = w1.new_empty(shape)
            with torch.no_grad():
                torch.cat([w1, w3], dim=1, out=self.weights)
            self._key = key
            self.builds += 1
        return self.weights

    def mark_written(self, w1: torch.Tensor, w3: torch.Tensor, holds_weights: bool = False) -> None:
        """The optimizer wrote the new w1 and w3 into `weights` as well, or (holds_weights) only there."""
        self._key = self._key_of(w1, w3)
        self.holds_weights = holds_weights

    @torch.no_grad()
    def write_back(self, w1: torch.Tensor, w3: torch.Tensor) -> None:
        """w1 and w3 made current where the last step wrote them only here and nothing has written them since."""
        if self.holds_weights and self._key == self._key_of(w1, w3):
            inter = w1.shape[1]
            w1.copy_(self.weights[:, :inter])
            w3.copy_(self.weights[:, inter:])
            self._key = self._key_of(w1, w3)
        self.holds_weights = False

    def invalidate(self) -> None:
        """Rebuilt at the next forward: the weights were written other than by the one-pass step (write_back
        first where the cache may hold them)."""
        self._key = None
        self.holds_weights = False


class GateUpCaches:
    """Every cached expert module's GateUpCache, and which half of which cache each gate/up weight is: what
    the one-pass step writes besides the weights."""

    def __init__(self):
        self.entries: list[tuple[GateUpCache, torch.Tensor, torch.Tensor]] = []
        # id of each gate/up weight -> its cache, its half, and the ids of both halves
        self._targets: dict[int, tuple[GateUpCache, int, set[int]]] = {}
        self._modules: list[torch.nn.Module] = []
        self.hold_weights = False  # the step writes the gate/up weights into the caches only (see the module)

    def add(self, cache: GateUpCache, w1: torch.Tensor, w3: torch.Tensor, module: torch.nn.Module) -> None:
        """`cache` of `module`'s gate and up weights w1 and w3."""
        self.entries.append((cache, w1, w3))
        self._modules.append(module)
        pair = {id(w1), id(w3)}
        self._targets[id(w1)], self._targets[id(w3)] = (cache, 0, pair), (cache, 1, pair)

    def write_back_before_state_dicts(self) -> list:
        """Each expert module's weights written back before its state_dict is taken; the hooks' handles."""
        return [module.register_state_dict_pre_hook(lambda *args, cache=cache, w1=w1, w3=w3, **kwargs:
                                                    cache.write_back(w1, w3))
                for module, (cache, w1, w3) in zip(self._modules, self.entries)]

    def covers_any(self, params) -> bool:
        return any(id(p) in self._targets for p in params)

    def mirrors(self, params: list, written: dict[GateUpCache, set[int]],
                held: set[GateUpCache] | None = None) -> list[Mirror | None]:
        """The Mirror of each parameter's new weights (None: not a cached gate/up weight, or padding);
        `written` collects which halves of which cache they cover. With `held` (a set, collecting them), the
        mirrors of the caches whose both halves are among `params` hold the weights (adamw.Mirror.holds_weight)."""
        present = {id(p) for p in params if p is not None}
        mirrors = []
        for param in params:
            cache, half, pair = self._targets.get(id(param), (None, None, None)) if param is not None else (None,) * 3
            if cache is None or cache.weights is None:
                mirrors.append(None)
                continue
            holds = held is not None and pair <= present
            if holds:
                held.add(cache)
            mirrors.append(Mirror(cache.weights, half=half, block=math.prod(param.shape[1:]), holds_weight=holds))
            written.setdefault(cache, set()).add(half)
        return mirrors

    def after_step(self, written: dict[GateUpCache, set[int]], held: set[GateUpCache] = frozenset()) -> None:
        """Caches whose both halves the step wrote are current (those in `held` hold the weights); the others
        (updated in part elsewhere, by another rank, then all-gathered) are rebuilt by their next forward."""
        for cache, w1, w3 in self.entries:
            if written.get(cache) == {0, 1}:
                cache.mark_written(w1, w3, holds_weights=cache in held)
            else:
                cache.write_back(w1, w3)
                cache.invalidate()

    def write_back(self) -> None:
        """Every gate/up weight current where its cache holds it (before a reader other than the forward)."""
        for cache, w1, w3 in self.entries:
            cache.write_back(w1, w3)

    def invalidate(self) -> None:
        """After the weights changed other than by the one-pass step (DeepSpeed's step, a checkpoint load): each
        cache rebuilt at its next forward, what it held written back first unless the weights were written since."""
        for cache, w1, w3 in self.entries:
            cache.write_back(w1, w3)
            cache.invalidate()
