"""Fused RMSNorm and RoPE from liger-kernel, swapped into a loaded Qwen3-MoE model on the GPU.

Replaces (transformers 5.17.0, models/qwen3_moe/modeling_qwen3_moe.py): Qwen3MoeRMSNorm's forward on the
model's norm modules, and the module-level names apply_rotary_pos_emb and Qwen3MoeRMSNorm, which liger sets
for the whole process; `restore` puts those back. Guarded by tests/unit/fastpath/test_liger.py (packed loss
and gradients equal to the stock modules', GPU).

Unfused, each of a layer's four RMSNorms (input, post-attention, per-head q and k) and the rotary
embedding run as chains of fp32 elementwise kernels, forward and backward; liger's Triton kernels do
each in one pass with the same arithmetic (fp32 statistics, weight applied after the cast back, as
Qwen3's RMSNorm does). Expert SwiGLU is AutoEP's own fused kernel; liger's loss is --loss-impl.

RoPE is pinned to liger's Triton kernel: liger 0.8.5 picks its CuTe DSL RoPE for our shapes wherever `cutlass` is
importable (flash-attn 4 and quack bring it), and that one costs ~0.3 ms of host time a call for a ~40 us kernel,
which the host-bound forward pays as GPU idle time in every layer (BENCHMARKS.md, 2026-12-03 later).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import nn

from ..config import ConfigError
from .applied import Applied

REPLACES = "Qwen3MoeRMSNorm.forward, modeling_qwen3_moe.apply_rotary_pos_emb"
ROPE_IMPL = "nvidia-triton"  # liger 0.8.5's name for its Triton RoPE
_triton_rope = None  # liger's OpImpl for it, resolved once by _pin_triton_rope


def triton_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """liger's rotary embedding (liger_rotary_pos_emb) on its Triton kernel, whatever liger would auto-select. Calls
    the implementation resolved at patch time: liger's dispatch() resolves it again on every call, host time
    that the host-bound forward pays in every layer."""
    return _triton_rope.call(q, k, cos, sin, position_ids, unsqueeze_dim)


def _pin_triton_rope(modeling_qwen3_moe) -> None:
    """Route the module's rotary embedding to liger's Triton kernel where liger can run it; elsewhere liger's own
    choice stays (the same arithmetic)."""
    global _triton_rope
    from liger_kernel.backends.dispatch import ImplNotAvailableError, resolve_impl

    try:
        _triton_rope = resolve_impl("rope", requested=ROPE_IMPL)
    except ImplNotAvailableError:
        return
    modeling_qwen3_moe.apply_rotary_pos_emb = triton_rope


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
    _pin_triton_rope(modeling_qwen3_moe)
    replaced = {name: value for name, value in before.items() if vars(modeling_qwen3_moe).get(name) is not value}

    def restore():
        for name, value in replaced.items():
            setattr(modeling_qwen3_moe, name, value)

    return Applied("liger_norm_rope", REPLACES), restore
