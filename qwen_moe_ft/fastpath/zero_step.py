"""DeepSpeed ZeRO-1/2's optimizer step in fewer passes over the gradients.

Replaces (deepspeed 0.19.8, deepspeed/runtime/zero/stage_1_and_2.py, on one DeepSpeedZeroOptimizer):
- fuse_adam_step: step(), and the torch AdamW it wraps by adamw.MasterAdamW. DeepSpeed flattens the bf16
  gradient partition, copies it to fp32, runs Adam, and copies the fp32 master partition back to the bf16
  weights; MasterAdamW.update does all of it in one pass over the gradients where they lie. Everything
  else (the norm, grad_norm.py; overflow skip; all-gather of the updated partitions) is DeepSpeed's own
  code, and any step that would skip falls back to DeepSpeed's. The same pass writes the experts' gate/up
  concatenations (gate_up_cache.py) and may keep the masters as the bf16 weights' low bits (master_bits.py). Its
  launches for the forward's stages may run on a side stream beside the next forward (step_overlap.py).
- fold_clip_into_adam (where fuse_adam_step is refused): unscale_and_clip_grads. DeepSpeed multiplies the
  fp32 gradient partition by 1/clip in a pass of its own; torch's fused AdamW divides each gradient by a
  `grad_scale` tensor inside its kernel, so the clip factor is handed to it instead.
- keep_unreduced_grads_in_place: copy_grads_in_partition, for gradients whose copy moves nothing, and
  reduce_independent_p_g_buckets_and_remove_grads, for the small ones of one-rank groups.
Guarded by tests/unit/fastpath/test_zero_step.py (weights and master weights equal to DeepSpeed's own step).
"""
from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

from .adamw import MasterAdamW, Mirror
from .applied import Applied
from .expert_mlp import LayoutPreservingGateUp
from .gate_up_cache import GateUpCache
from .grad_norm import norm_in_backward, piece_owners
from .master_bits import settled
from .state import ZeroState
from .step_overlap import split_by_stage


def _not_zero_optimizer(optimizer) -> str:
    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return f"the optimizer is {type(optimizer).__name__}, not DeepSpeed's ZeRO-1/2 optimizer"
    return "CPU offload" if optimizer.cpu_offload else ""


def _compact_grad_buffer(optimizer) -> bool:
    """Whether DeepSpeed accumulates some group's gradients in an fp32 partition buffer, a path these patches
    do not cover."""
    return any(optimizer._use_compact_grad_partition_buffer(i) for i in range(len(optimizer.bit16_groups)))


def _grad_divisor(optimizer: DeepSpeedZeroOptimizer, total_norm) -> torch.Tensor | None:
    """What DeepSpeed's unscale_and_clip_grads divides the gradients by (loss scale times clip factor), as
    a one-element device tensor so no host sync is needed; None when it would do nothing."""
    if optimizer.clip_grad == 0.0 and optimizer.loss_scale == 1.0:
        return None
    scale = torch.full((1,), float(optimizer.loss_scale), dtype=torch.float32, device=optimizer.device)
    if optimizer.clip_grad > 0.0:
        # step() skips invalid norms before this point; an invalid one here still must not pass unclipped
        norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm, float("inf"))
        scale = scale * torch.clamp((norm.float() / optimizer.loss_scale + 1e-6) / optimizer.clip_grad, min=1.0)
    return scale


def fold_clip_into_adam(state: ZeroState) -> Applied:
    """Let torch's fused AdamW apply the loss-scale/clip factor; refused where the wrapped optimizer is not a
    fused torch Adam/AdamW."""
    optimizer = state.optimizer
    adam = getattr(optimizer, "optimizer", None)
    refused = _not_zero_optimizer(optimizer) or (
        "" if isinstance(adam, torch.optim.Adam | torch.optim.AdamW) and adam.defaults.get("fused")
        else "the wrapped optimizer is not torch's fused Adam/AdamW")
    if not refused:
        optimizer.unscale_and_clip_grads = lambda grad_groups_flat, total_norm: setattr(
            optimizer.optimizer, "grad_scale", _grad_divisor(optimizer, total_norm))
    return Applied("clip_in_adam", "DeepSpeedZeroOptimizer.unscale_and_clip_grads", refused)


def _fused_step(state: ZeroState, deepspeed_step) -> None:
    """DeepSpeed's ZeRO-1/2 step() for a bf16 or fp32 run without offload, with the per-group gradient flatten,
    fp32 copy, Adam and bf16 copy-back done by MasterAdamW.update in one pass."""
    optimizer = state.optimizer
    norm = optimizer.scaled_global_norm()
    if is_invalid_grad_norm(norm):
        state.gate_up.invalidate()
        # DeepSpeed's own overflow handling (skip, clear, count), which reads (and may write) the fp32 masters
        return settled(state, deepspeed_step, writes=True)()
    bits = state.master_bits
    if bits is not None:
        bits.release()
    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
    optimizer.overflow = False
    previous_loss_scale = optimizer.loss_scale
    optimizer._update_scale(False)
    optimizer._global_grad_norm = norm / previous_loss_scale
    divisor = _grad_divisor(optimizer, norm)
    adam: MasterAdamW = optimizer.optimizer
    written: dict[GateUpCache, set[int]] = {}
    overlap = state.overlap
    if overlap is not None:
        overlap.begin()
    side = {}
    # the largest partitions (the experts) first: their long kernels keep the GPU busy while the host
    # launches the rest
    for i in sorted(range(len(optimizer.bit16_groups)), key=lambda i: -optimizer.partition_size[i]):
        partition_id = dist.get_rank(group=optimizer.real_dp_process_group[i])
        optimizer.free_grad_in_param_list(optimizer.params_not_in_partition[i])
        # laid end to end these are exactly what DeepSpeed flattens into the partition (padding past them)
        grads = [g.view(-1) for g in optimizer.averaged_gradients[i]]
        master = optimizer.single_partition_of_fp32_groups[i]
        group = adam.param_groups[i]
        assert group["params"][0] is master, "optimizer param group order differs from DeepSpeed's partitions"
        owners = _whole_group_owners(state, i, grads)
        pieces = adam.plan(group, master, grads, out=optimizer.parallel_partitioned_bit16_groups[i][partition_id],
                           grad_scale=divisor, group_index=i, mirrors=_gate_up_mirrors(state, i, owners, written),
                           **(bits.step_kwargs(i) if bits is not None else {}))
        # a group all-gathered over several ranks (owners None) is complete before the all-gather below, on this stream
        if overlap is not None and owners is not None:
            pieces, stages = split_by_stage(pieces, owners, overlap.stage_of)
            for k, launches in stages.items():
                side.setdefault(k, []).extend(launches)
        for piece in pieces:
            piece.run()
        optimizer.free_grad_in_param_list(optimizer.params_in_partition[i])
        optimizer.averaged_gradients[i] = None
        optimizer.all_grad_tensors[i] = None
    if overlap is not None:
        overlap.launch(side, divisor)
    all_gather_dp_groups(groups_flat=optimizer.bit16_groups_flat,
                         partitioned_param_groups=optimizer.parallel_partitioned_bit16_groups,
                         dp_process_group=optimizer.real_dp_process_group,
                         start_alignment_factor=optimizer.nccl_start_alignment_factor,
                         allgather_bucket_size=optimizer.allgather_bucket_size)
    for i in range(len(optimizer.bit16_groups)):
        optimizer._update_model_bit16_weights(i)
    optimizer._lazy_init_hp_params_optimizer_state()
    state.gate_up.after_step(written)


def _whole_group_owners(state: ZeroState, i: int, grads: list[torch.Tensor]) -> list | None:
    """The parameter of each of group i's gradient pieces (piece_owners), where the group is one rank's whole (so
    the step writes every element of its weights) in one piece per parameter; else None."""
    if state.group_dp_size(i) > 1:
        return None
    return piece_owners(grads, state.optimizer.params_in_partition[i])


def _gate_up_mirrors(state: ZeroState, i: int, owners: list | None,
                     written: dict[GateUpCache, set[int]]) -> list[Mirror | None] | None:
    """The Mirrors of group i's gradient pieces (owners: _whole_group_owners); None where there is nothing to
    mirror."""
    if owners is None or not state.gate_up.covers_any(state.optimizer.params_in_partition[i]):
        return None
    return state.gate_up.mirrors(owners, written)


def mirror_gate_up_weights(state: ZeroState, forwards: list[LayoutPreservingGateUp]) -> Applied:
    """Have the one-pass step (fuse_adam_step, installed first) keep every trainable gate/up expert weight's
    concatenation current instead of each forward rebuilding it. Where a step updates only part of the
    weights on this rank (expert data parallelism over several ranks) or falls back to DeepSpeed's own
    step, the caches are rebuilt at the next forward."""
    name, replaces = "gate_up_cache", "the gate/up concatenation in each GroupedExperts forward"
    if not state.fused_step:
        return Applied(name, replaces, "needs one_pass_adamw")
    kept = [f for f in forwards if not f.recompute and f.module.w1.requires_grad and f.module.w3.requires_grad]
    if not kept:
        return Applied(name, replaces, "no trainable expert module without --gate-up-recompute")
    for forward in kept:
        state.gate_up.add(forward.keep_cache(), forward.module.w1, forward.module.w3)
    return Applied(name, replaces)


def fuse_adam_step(state: ZeroState, state_dtype: torch.dtype) -> Applied:
    """Swap the ZeRO optimizer's AdamW for MasterAdamW (moments in `state_dtype`) and its step for
    _fused_step; refused where DeepSpeed's step does more than that path covers: offload, fp16 weights
    (loss scaling), an fp32 gradient-accumulation buffer, Muon, or an optimizer other than torch's AdamW
    without amsgrad."""
    optimizer = state.optimizer
    adam = getattr(optimizer, "optimizer", None)
    refused = _not_zero_optimizer(optimizer) or (
        f"{optimizer.dtype} weights" if optimizer.dtype not in (torch.bfloat16, torch.float32)
        else "no gradient norm computed" if not optimizer.compute_grad_norm
        else "ZenFlow or torch autocast" if optimizer.zenflow or optimizer.torch_autocast_gradscaler
        else "the wrapped optimizer is not torch's AdamW without amsgrad"
        if type(adam) is not torch.optim.AdamW or adam.defaults.get("amsgrad")
        else "an fp32 gradient accumulation buffer"
        if _compact_grad_buffer(optimizer) else "")
    if not refused:
        optimizer.optimizer = MasterAdamW.replacing(adam, state_dtype)
        deepspeed_step = optimizer.step
        optimizer.step = lambda closure=None: _fused_step(state, deepspeed_step)
        state.fused_step = True
    return Applied("one_pass_adamw", "DeepSpeedZeroOptimizer.step and its torch AdamW", refused)


def _copy_grads_in_partition(state: ZeroState, deepspeed_copy, param, group_idx=None) -> None:
    """DeepSpeed's copy into the partition buffer, except in a one-rank group, where only gradients larger than
    a reduce bucket still come here (DeepSpeed reduces those where autograd wrote them; the smaller ones stayed
    in place in _bucket_or_keep): there the gradient already is this rank's whole partition of its parameter."""
    optimizer = state.optimizer
    if group_idx is None:
        group_idx = optimizer._get_param_group_idx(param)
    if state.group_dp_size(group_idx) == 1:
        norm_in_backward(state, param)
        return
    if optimizer.grads_in_partition is None:  # DeepSpeed would size it for every parameter of the partition
        size = sum(p.numel() for i, group in enumerate(optimizer.params_in_partition) for p in group
                   if state.group_dp_size(i) > 1)
        optimizer.grads_in_partition = torch.empty(size, dtype=optimizer.dtype, device=torch.device(optimizer.device))
        optimizer.grads_in_partition_offset = 0
    deepspeed_copy(param, group_idx)


def _bucket_or_keep(state: ZeroState, deepspeed_reduce, param, i: int) -> None:
    """DeepSpeed's gradient hook body (reduce_independent_p_g_buckets_and_remove_grads), except for a gradient
    of a one-rank group that fits a reduce bucket: no copy into the bucket, no all-reduce over one rank, no copy
    into the partition buffer, only the bookkeeping reduce_ipg_grads would do. The epilogue collects it from
    param.grad as it collects the copies (get_all_grad_tensors)."""
    optimizer = state.optimizer
    if param.numel() > optimizer.reduce_bucket_size or state.group_dp_size(i) > 1:
        return deepspeed_reduce(param, i)
    if param.numel() == 0 or not getattr(param, "ds_grad_is_ready", True):
        return None  # DeepSpeed skips these too
    param_id = optimizer.get_param_id(param)
    assert not optimizer.params_already_reduced[param_id], f"gradient of parameter {param_id} computed twice"
    optimizer.params_already_reduced[param_id] = True
    return None


def keep_unreduced_grads_in_place(state: ZeroState) -> Applied:
    """Leave gradients in the tensors autograd wrote where ZeRO's copies move nothing between ranks: in a
    one-rank group (every expert weight at EP = number of GPUs, every weight on one GPU), DeepSpeed copies a
    gradient that fits a reduce bucket into the bucket, all-reduces the bucket over its one rank and copies
    it into the partition buffer (two copies and ~0.2 ms of Python a parameter, which dominate the backward's
    host time with LoRA's hundreds of small parameters), and copies a larger one into the partition buffer.
    The step reads the gradients where they are, as it read their copies. Refused without contiguous
    gradients, with offload, ZenFlow, AutoEP's tensor-parallel folding or an fp32 accumulation buffer, where
    DeepSpeed takes other paths."""
    optimizer = state.optimizer
    refused = _not_zero_optimizer(optimizer) or (
        "contiguous_gradients is off" if not optimizer.contiguous_gradients
        else "ZenFlow" if optimizer.zenflow
        else "AutoEP tensor-parallel folding" if getattr(optimizer, "autoep_folding_tp_group", None) is not None
        else "an fp32 gradient accumulation buffer"
        if _compact_grad_buffer(optimizer) else "")
    if not refused:
        deepspeed_copy = optimizer.copy_grads_in_partition
        optimizer.copy_grads_in_partition = lambda param, group_idx=None: _copy_grads_in_partition(
            state, deepspeed_copy, param, group_idx)
        deepspeed_reduce = optimizer.reduce_independent_p_g_buckets_and_remove_grads
        optimizer.reduce_independent_p_g_buckets_and_remove_grads = lambda param, i: _bucket_or_keep(
            state, deepspeed_reduce, param, i)
    return Applied("grads_in_place", "DeepSpeedZeroOptimizer.copy_grads_in_partition, "
                   ".reduce_independent_p_g_buckets_and_remove_grads", refused)
