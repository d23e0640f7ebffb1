"""Fused RMSNorm and RoPE from liger-kernel, swapped into a loaded Qwen3-MoE model on the GPU.

Replaces (transformers 5.17.0, models/qwen3_moe/modeling_qwen3_moe.py): Qwen3MoeRMSNorm's forward on the
model's norm modules, and the module-level names apply_rotary_pos_emb and Qwen3MoeRMSNorm, which liger sets
for the whole process; `restore` puts those back. Guarded by tests/unit/fastpath/test_liger.py (packed loss
and gradients equal to the stock modules', GPU).

Unfused, each of a layer's four RMSNorms (input, post-attention, per-head q and k) and the rotary
embedding run as chains of fp32 elementwise kernels, forward and backward; liger's Triton kernels do
each in one pass with the same arithmetic (fp32 statistics, weight applied after the cast back, as
Qwen3's RMSNorm does); norms.py then moves most norms to kernels that cost less host time. Expert SwiGLU is
AutoEP's own fused kernel; liger's loss is --loss-impl.

RoPE runs the implementation liger picks for the GPU (its CuTe DSL kernel where `cutlass` is importable, as with
flash-attn 4 or quack, else Triton), resolved once at patch time: liger's own entry point resolves it again on every
call, host time that the host-bound forward pays in every layer (docs/benchmark-history.md, 2026-12-03, commits
f4489ad..38ddb76).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import nn

from ..config import ConfigError
from .applied import Applied

REPLACES = "Qwen3MoeRMSNorm.forward, modeling_qwen3_moe.apply_rotary_pos_emb"
_rope = None  # the OpImpl liger resolved for RoPE here, bound by _bind_rope


def liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """liger's rotary embedding (liger_rotary_pos_emb) on the implementation resolved at patch time."""
    return _rope.call(q, k, cos, sin, position_ids, unsqueeze_dim)


def _bind_rope(modeling_qwen3_moe) -> None:
    """Route the module's rotary embedding to liger's implementation for this GPU, resolved now; where liger
    cannot resolve one, the name liger set stays (the same arithmetic)."""
    global _rope
    from liger_kernel.backends.dispatch import ImplNotAvailableError, resolve_impl

    try:
        _rope = resolve_impl("rope")
    except ImplNotAvailableError:
        return
    modeling_qwen3_moe.apply_rotary_pos_emb = liger_rope


def select_fused_kernels(requested: str, device_type: str) -> str:
    """auto: liger when on a GPU and installed, else none; liger on request must be usable."""
    usable = device_type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if requested == "auto":
        return "liger" if usable else "none"
    if requested == "liger" and not usable:
        raise ConfigError("--fused-kernels liger needs a GPU and the liger-kernel package "
                          "(pip install 'qwen-moe-ft[liger]'); use --fused-kernels none")
    return requested


def apply_liger(model: nn.Module, choice: str) -> tuple[Applied, Callable[[], None]]:
    """Patch `model` (before DeepSpeed wraps it) with liger's norm and rotary kernels if `choice` is liger;
    returns what was done and the function that restores transformers' module-level names."""
    if choice != "liger":
        return Applied("liger_norm_rope", REPLACES, f"--fused-kernels {choice}"), lambda: None
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    before = dict(vars(modeling_qwen3_moe))
    apply_liger_kernel_to_qwen3_moe(rope=True, rms_norm=True, swiglu=False, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    _bind_rope(modeling_qwen3_moe)
    replaced = {name: value for name, value in before.items() if vars(modeling_qwen3_moe).get(name) is not value}

    def restore():
        for name, value in replaced.items():
            setattr(modeling_qwen3_moe, name, value)

    return Applied("liger_norm_rope", REPLACES), restore
