"""DeepSpeed ZeRO-1/2's optimizer step in fewer passes over the gradients.

Gradient checks: before Adam, DeepSpeed 0.19.8's bf16 ZeRO step reads every gradient three more times
than it needs to: it copies each gradient to fp64 and takes the norm of the copy (for clipping), and
runs an amax and an amin over it (looking for inf/NaN). On the H100 benchmark that was 7 ms of the 17.8 ms optimizer step of
one Qwen3-30B-A3B layer (BENCHMARKS.md). Here the norm is accumulated in fp32 straight from the bf16
gradients, and non-finite gradients are found from that norm: an inf or NaN anywhere makes the norm
non-finite, which DeepSpeed's own step already treats as an overflow, so the update is skipped exactly
as before. (A norm beyond fp32's range, above 1.8e19, now also skips the step, where fp64 would have
clipped it.)

Clipping: DeepSpeed multiplies the fp32 gradient partition by 1/clip in a pass of its own (2.3 ms of
that step); torch's fused AdamW divides each gradient by a `grad_scale` tensor inside its kernel, so the
clip factor is handed to it instead (build_ds_config selects torch's fused AdamW).
"""
from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def _fp32_grad_norm(optimizer: DeepSpeedZeroOptimizer, gradients, params, norm_type=2) -> torch.Tensor:
    """DeepSpeed's get_grad_norm_direct for the L2 norm of this rank's gradient partition, reduced over the
    data-parallel group; invalid norms come back as -1, the sentinel DeepSpeed's step checks for."""
    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, gradients, params, norm_type)
    grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    device = torch.device(optimizer.device)
    if grads:
        squares = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=device)
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    optimizer._model_parallel_all_reduce(tensor=squares, op=dist.ReduceOp.SUM)
    norm = squares.sqrt()
    mask_nan_or_inf_with_val_inplace(norm, device=optimizer.device)
    return norm


def lean_grad_checks(optimizer) -> bool:
    """Install the one-pass norm and overflow check on a DeepSpeed ZeRO-1/2 optimizer; False (nothing done)
    for any other optimizer, or where the step would not compute a norm (nothing to find overflow from)."""
    if (type(optimizer) is not DeepSpeedZeroOptimizer or not optimizer.compute_grad_norm or optimizer.cpu_offload
            or optimizer.model_parallel_world_size > 1):  # tensor-parallel duplicates: DeepSpeed's norm filters them
        return False
    optimizer.get_grad_norm_direct = lambda gradients, params, norm_type=2: _fp32_grad_norm(
        optimizer, gradients, params, norm_type)
    # step() marks an invalid norm as an overflow when check_grad_overflow is set; that check replaces
    # the separate amax/amin pass over every gradient.
    optimizer.check_grad_overflow = True
    optimizer.check_overflow = lambda partition_gradients=True: None
    return True


def _hand_clip_to_adam(optimizer: DeepSpeedZeroOptimizer, total_norm) -> None:
    """DeepSpeed's unscale_and_clip_grads, with the division left to the Adam kernel."""
    adam = optimizer.optimizer
    if optimizer.clip_grad == 0.0 and optimizer.loss_scale == 1.0:
        adam.grad_scale = None
        return
    scale = torch.full((1,), float(optimizer.loss_scale), dtype=torch.float32, device=optimizer.device)
    if optimizer.clip_grad > 0.0:
        # step() skips invalid norms before this point; an invalid one here still must not pass unclipped
        norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm, float("inf"))
        scale = scale * torch.clamp((norm.float() / optimizer.loss_scale + 1e-6) / optimizer.clip_grad, min=1.0)
    adam.grad_scale = scale


def fold_clip_into_adam(optimizer) -> bool:
    """Let torch's fused AdamW apply the loss-scale/clip factor; False (nothing done) where the wrapped
    optimizer is not a fused torch Adam/AdamW."""
    adam = getattr(optimizer, "optimizer", None)
    if (type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload
            or not isinstance(adam, torch.optim.Adam | torch.optim.AdamW) or not adam.defaults.get("fused")):
        return False
    optimizer.unscale_and_clip_grads = lambda grad_groups_flat, total_norm: _hand_clip_to_adam(optimizer, total_norm)
    return True
