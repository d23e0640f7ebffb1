"""Fused RMSNorm and RoPE from liger-kernel, swapped into a loaded Qwen3-MoE model on the GPU.

Unfused, each of a layer's four RMSNorms (input, post-attention, per-head q and k) and the rotary
embedding run as chains of fp32 elementwise kernels, forward and backward; liger's Triton kernels do
each in one pass with the same arithmetic (fp32 statistics, weight applied after the cast back, as
Qwen3's RMSNorm does). Expert SwiGLU is AutoEP's own fused kernel; liger's loss is --loss-impl.
"""
from __future__ import annotations

import importlib.util

from torch import nn

from .config import ConfigError

def select_fused_kernels(requested: str, device_type: str) -> str:
    """auto: liger when on a GPU and installed, else none; liger on request must be usable."""
    usable = device_type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if requested == "auto":
        return "liger" if usable else "none"
    if requested == "liger" and not usable:
        raise ConfigError("--fused-kernels liger needs a GPU and the liger-kernel package "
                          "(pip install 'qwen-moe-ft[liger]'); use --fused-kernels none")
    return requested


def apply_fused_kernels(model: nn.Module, choice: str) -> nn.Module:
    """Patch `model` (before DeepSpeed wraps it) with the chosen fused norm and rotary kernels."""
    if choice == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe

        apply_liger_kernel_to_qwen3_moe(rope=True, rms_norm=True, swiglu=False, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=model)
    return model
