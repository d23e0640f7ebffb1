"""The model's RMSNorms on the kernel that suits their row width, after liger's patch (fused kernels on a GPU).

Replaces (liger-kernel 0.8.5 on transformers 5.17.0): LigerRMSNorm.forward, which liger binds to each
Qwen3MoeRMSNorm of the model. The hidden-size norms (each layer's input and post-attention norms, the final norm) run
our Triton RMSNorm (rms_norm.py: its backward is one pass where torch's fused RMSNorm reads the rows twice; left out
by --fast-path-skip's default: no step measurably faster with it), or torch's own (F.rms_norm: one fused kernel
forward and one backward on CUDA); the per-head q/k norms (rows of head_dim = 128) run quack's RMSNorm where quack's
kernels run (quack_experts.quack_unavailable_because), else ours, whose backward liger's is three times slower than.
Guarded by tests/unit/fastpath/test_norms.py and test_rms_norm.py (outputs and gradients against the stock modules).

Why not liger's everywhere: the forward was host-bound (the GPU waited for the host to issue its kernels), and
liger's Triton launch costs ~90 us of host time a call against ~23 for torch's at the same GPU time on the wide rows;
torch's kernel is 4x slower than liger's on the 128-wide rows, where quack's is as fast forward, twice as fast
backward and cheaper to launch (docs/benchmark-history.md, 2026-12-03, commits f4489ad..38ddb76).
Ours and liger's compute as Qwen3's module does (the normalised rows rounded to bf16, then multiplied by the weight);
torch's and quack's apply the weight before the one rounding: within one bf16 rounding of each other.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .applied import Applied

HIDDEN_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
HEAD_NORMS = ("q_norm", "k_norm")


def _torch_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def _quack_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from quack.rmsnorm import rmsnorm

    return rmsnorm(hidden_states, self.weight, eps=self.variance_epsilon)


def _triton_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from .rms_norm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _norms(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    """The model's RMSNorm modules (a 1-D weight and variance_epsilon, as Qwen3MoeRMSNorm has) with these names."""
    return [module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in names and hasattr(module, "variance_epsilon")
            and getattr(module, "weight", None) is not None and module.weight.dim() == 1]


def _bind(modules: list[nn.Module], forward) -> None:
    for module in modules:
        module.forward = types.MethodType(forward, module)


def torch_hidden_norms(model: nn.Module) -> Applied:
    """The hidden-size norms on torch's fused RMSNorm."""
    modules = _norms(model, HIDDEN_NORMS)
    _bind(modules, _torch_rms_norm)
    return Applied("torch_hidden_norms", "LigerRMSNorm.forward on the hidden-size RMSNorms",
                   "" if modules else "no hidden-size RMSNorm in the model")


def quack_head_norms(model: nn.Module, device: torch.device) -> Applied:
    """The per-head q/k norms on quack's RMSNorm, where it runs: quack's version and the GPU suit, and one small
    call of it, forward and backward at the norms' width, runs."""
    from .quack_experts import first_error, quack_unavailable_because

    name, replaces = "quack_head_norms", "LigerRMSNorm.forward on the q/k RMSNorms"
    if why := quack_unavailable_because(device):
        return Applied(name, replaces, why)
    modules = _norms(model, HEAD_NORMS)
    if not modules:
        return Applied(name, replaces, "no q/k RMSNorm in the model")
    if why := first_error(lambda: _probe_rms_norm(modules[0], device)):
        return Applied(name, replaces, f"a small call of quack's RMSNorm failed: {why}")
    _bind(modules, _quack_rms_norm)
    return Applied(name, replaces)


def triton_norms(model: nn.Module, device: torch.device, names: tuple[str, ...]) -> Applied:
    """The RMSNorms of these names (HIDDEN_NORMS or HEAD_NORMS) on rms_norm.py's Triton kernels, on a GPU with
    triton."""
    from .rms_norm import unavailable_because

    name = "triton_hidden_norms" if names == HIDDEN_NORMS else "triton_head_norms"
    replaces = f"LigerRMSNorm.forward on the {'hidden-size' if names == HIDDEN_NORMS else 'q/k'} RMSNorms"
    modules = _norms(model, names)
    if not modules:
        return Applied(name, replaces, f"no {' or '.join(names)} RMSNorm in the model")
    if why := unavailable_because(device, modules[0].weight.shape[0]):
        return Applied(name, replaces, why)
    _bind(modules, _triton_rms_norm)
    return Applied(name, replaces)


def _probe_rms_norm(module: nn.Module, device: torch.device) -> None:
    """quack's RMSNorm forward and backward on 4 rows of `module`'s width and dtype (which builds the kernels)."""
    from quack.rmsnorm import rmsnorm

    weight = module.weight.detach().to(device).requires_grad_()  # a view: the parameter's own grad stays untouched
    x = torch.ones(4, weight.shape[0], device=device, dtype=weight.dtype, requires_grad=True)
    out = rmsnorm(x, weight, eps=module.variance_epsilon)
    grads = torch.autograd.grad(out, (x, weight), torch.ones_like(out))
    if not all(torch.isfinite(t).all() for t in (out, *grads)):  # reading the flags waits for the kernels
        raise FloatingPointError("quack's RMSNorm gave non-finite values")
