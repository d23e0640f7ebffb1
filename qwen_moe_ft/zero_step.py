"""DeepSpeed ZeRO-1/2's optimizer step in fewer passes over the gradients.

Clipping: DeepSpeed multiplies the fp32 gradient partition by 1/clip in a pass of its own (2.3 ms of
the 17.8 ms optimizer step of one Qwen3-30B-A3B layer on the H100, BENCHMARKS.md); torch's fused AdamW
divides each gradient by a `grad_scale` tensor inside its kernel, so the clip factor is handed to it
instead (build_ds_config selects torch's fused AdamW).

The step itself (fuse_adam_step): DeepSpeed flattens the bf16 gradient partition, copies it to fp32, runs
Adam, and copies the fp32 master partition back to the bf16 weights. adamw.MasterAdamW does all of it in
one pass over the gradients where they lie; everything else (the norm, grad_norm.py; overflow skip,
all-gather of the updated partitions) is DeepSpeed's own code, and any step that would skip falls back to
DeepSpeed's. The same pass writes the experts' gate/up concatenations (mirror_gate_up_weights). Before
that, keep_unreduced_grads_in_place spares the expert gradients ZeRO's copy into its partition buffer
where their group is one rank.
"""
from __future__ import annotations

import math

import torch
from deepspeed import comm as dist
from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

from .adamw import MasterAdamW, Mirror
from .expert_mlp import GateUpCache, cache_gate_up_weights
from .grad_norm import norm_in_backward, piece_owners


def _group_dp_size(optimizer: DeepSpeedZeroOptimizer, i: int) -> int:
    """World size of parameter group i's data-parallel group, looked up once (it is on every step's path)."""
    sizes = optimizer.__dict__.setdefault("_qmf_group_sizes", {})
    if i not in sizes:
        sizes[i] = dist.get_world_size(group=optimizer.real_dp_process_group[i])
    return sizes[i]


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


def _hand_clip_to_adam(optimizer: DeepSpeedZeroOptimizer, total_norm) -> None:
    """DeepSpeed's unscale_and_clip_grads, with the division left to the Adam kernel."""
    optimizer.optimizer.grad_scale = _grad_divisor(optimizer, total_norm)


def fold_clip_into_adam(optimizer) -> bool:
    """Let torch's fused AdamW apply the loss-scale/clip factor; False (nothing done) where the wrapped
    optimizer is not a fused torch Adam/AdamW."""
    adam = getattr(optimizer, "optimizer", None)
    if (type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload
            or not isinstance(adam, torch.optim.Adam | torch.optim.AdamW) or not adam.defaults.get("fused")):
        return False
    optimizer.unscale_and_clip_grads = lambda grad_groups_flat, total_norm: _hand_clip_to_adam(optimizer, total_norm)
    return True


def _fused_step(optimizer: DeepSpeedZeroOptimizer, deepspeed_step) -> None:
    """DeepSpeed's ZeRO-1/2 step() for a bf16 or fp32 run without offload, with the per-group gradient flatten,
    fp32 copy, Adam and bf16 copy-back done by MasterAdamW.update in one pass."""
    norm = optimizer.scaled_global_norm()
    if is_invalid_grad_norm(norm):
        invalidate_gate_up_caches(optimizer)
        return deepspeed_step()  # DeepSpeed's own overflow handling (skip, clear, count)
    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
    optimizer.overflow = False
    previous_loss_scale = optimizer.loss_scale
    optimizer._update_scale(False)
    optimizer._global_grad_norm = norm / previous_loss_scale
    divisor = _grad_divisor(optimizer, norm)
    adam: MasterAdamW = optimizer.optimizer
    mirrored: dict[GateUpCache, set[int]] = {}
    # the largest partitions (the experts) first: their long kernels keep the GPU busy while the host
    # launches the rest
    for i in sorted(range(len(optimizer.bit16_groups)), key=lambda i: -optimizer.partition_size[i]):
        partition_id = dist.get_rank(group=optimizer.real_dp_process_group[i])
        optimizer.free_grad_in_param_list(optimizer.params_not_in_partition[i])
        # laid end to end these are exactly what DeepSpeed flattens into the partition (padding past them)
        grads = [g.view(-1) for g in optimizer.averaged_gradients[i]]
        mirrors = _gate_up_mirrors(optimizer, i, grads, mirrored)
        master = optimizer.single_partition_of_fp32_groups[i]
        group = adam.param_groups[i]
        assert group["params"][0] is master, "optimizer param group order differs from DeepSpeed's partitions"
        adam.update(group, master, grads, out=optimizer.parallel_partitioned_bit16_groups[i][partition_id],
                    grad_scale=divisor, group_index=i, mirrors=mirrors)
        optimizer.free_grad_in_param_list(optimizer.params_in_partition[i])
        optimizer.averaged_gradients[i] = None
        optimizer.all_grad_tensors[i] = None
    all_gather_dp_groups(groups_flat=optimizer.bit16_groups_flat,
                         partitioned_param_groups=optimizer.parallel_partitioned_bit16_groups,
                         dp_process_group=optimizer.real_dp_process_group,
                         start_alignment_factor=optimizer.nccl_start_alignment_factor,
                         allgather_bucket_size=optimizer.allgather_bucket_size)
    for i in range(len(optimizer.bit16_groups)):
        optimizer._update_model_bit16_weights(i)
    optimizer._lazy_init_hp_params_optimizer_state()
    for cache, w1, w3 in getattr(optimizer, "qmf_gate_up_caches", []):
        if mirrored.get(cache) == {0, 1}:
            cache.mark_written(w1, w3)
        else:  # some of it was updated elsewhere (by another rank, then all-gathered)
            cache.invalidate()


def _gate_up_mirrors(optimizer: DeepSpeedZeroOptimizer, i: int, grads: list[torch.Tensor],
                     mirrored: dict[GateUpCache, set[int]]) -> list[Mirror | None] | None:
    """The Mirrors of group i's gradient pieces (None: no mirror), where the group is one rank's whole (so the
    step writes every element of its weights) in one piece per parameter: each gate/up weight into its
    module's GateUpCache. `mirrored` collects which halves of which cache are written; caches left out
    are rebuilt by their next forward."""
    targets = getattr(optimizer, "qmf_gate_up_targets", {})
    if not any(id(p) in targets for p in optimizer.params_in_partition[i]) or _group_dp_size(optimizer, i) > 1:
        return None
    params = piece_owners(grads, optimizer.params_in_partition[i])
    if params is None:
        return None
    mirrors = []
    for param in params:
        cache, half = targets.get(id(param), (None, None))
        if cache is None or cache.weights is None:
            mirrors.append(None)
            continue
        mirrors.append(Mirror(cache.weights, half=half, block=math.prod(param.shape[1:])))
        mirrored.setdefault(cache, set()).add(half)
    return mirrors


def mirror_gate_up_weights(optimizer, model: torch.nn.Module) -> int:
    """Have the one-pass step (fuse_adam_step, installed first) keep every trainable gate/up expert weight's
    concatenation current (expert_mlp.GateUpCache) instead of each forward rebuilding it; the number of
    expert modules. Where a step updates only part of the weights on this rank (expert data parallelism
    over several ranks) or falls back to DeepSpeed's own step, the caches are rebuilt at the next forward."""
    if not getattr(optimizer, "qmf_fused_step", False):
        return 0
    caches, targets = [], {}
    for module in model.modules():
        if (getattr(module, "layout_preserving_recompute", True) is False and module.w1.requires_grad
                and module.w3.requires_grad):
            cache = cache_gate_up_weights(module)
            caches.append((cache, module.w1, module.w3))
            targets[id(module.w1)], targets[id(module.w3)] = (cache, 0), (cache, 1)
    optimizer.qmf_gate_up_caches, optimizer.qmf_gate_up_targets = caches, targets
    return len(caches)


def invalidate_gate_up_caches(optimizer) -> None:
    """After the weights changed other than by the one-pass step (DeepSpeed's step, a checkpoint load)."""
    for cache, _, _ in getattr(optimizer, "qmf_gate_up_caches", []):
        cache.invalidate()


def fuse_adam_step(optimizer, state_dtype: torch.dtype) -> bool:
    """Swap the ZeRO optimizer's AdamW for MasterAdamW (moments in `state_dtype`) and its step for
    _fused_step; False (nothing done) where DeepSpeed's step does more than that path covers: offload,
    fp16 weights (loss scaling), an fp32 gradient-accumulation buffer, Muon, or an optimizer other than
    torch's AdamW without amsgrad."""
    adam = getattr(optimizer, "optimizer", None)
    if (type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.cpu_offload
            or optimizer.dtype not in (torch.bfloat16, torch.float32)
            or not optimizer.compute_grad_norm or optimizer.zenflow or optimizer.torch_autocast_gradscaler
            or type(adam) is not torch.optim.AdamW or adam.defaults.get("amsgrad")
            or any(optimizer._use_compact_grad_partition_buffer(i) for i in range(len(optimizer.bit16_groups)))):
        return False
    optimizer.optimizer = MasterAdamW.replacing(adam, state_dtype)
    deepspeed_step = optimizer.step
    optimizer.step = lambda closure=None: _fused_step(optimizer, deepspeed_step)
    optimizer.qmf_fused_step = True
    return True


def _reduced_in_place(optimizer: DeepSpeedZeroOptimizer, param, group_idx: int) -> bool:
    """A gradient DeepSpeed reduces where autograd wrote it (larger than a reduce bucket) in a group of one
    rank: nothing was reduced, and it already is this rank's whole partition of that parameter."""
    return (param.numel() > optimizer.reduce_bucket_size
            and _group_dp_size(optimizer, group_idx) == 1)


def _copy_grads_in_partition(optimizer: DeepSpeedZeroOptimizer, deepspeed_copy, param, group_idx=None) -> None:
    if group_idx is None:
        group_idx = optimizer._get_param_group_idx(param)
    if _reduced_in_place(optimizer, param, group_idx):
        norm_in_backward(optimizer, param)
        return
    if optimizer.grads_in_partition is None:  # DeepSpeed would size it for every parameter of the partition
        size = sum(p.numel() for i, group in enumerate(optimizer.params_in_partition) for p in group
                   if not _reduced_in_place(optimizer, p, i))
        optimizer.grads_in_partition = torch.empty(size, dtype=optimizer.dtype, device=torch.device(optimizer.device))
        optimizer.grads_in_partition_offset = 0
    deepspeed_copy(param, group_idx)


def keep_unreduced_grads_in_place(optimizer) -> bool:
    """Skip ZeRO's copy of a gradient into its contiguous partition buffer where the copy moves nothing
    between ranks: gradients larger than a reduce bucket (DeepSpeed reduces those where autograd wrote them)
    in a one-rank group, i.e. every expert weight at EP = number of GPUs, and on one GPU every such weight.
    The copy was 0.88 ms of GPU time per Qwen3-30B-A3B layer on one H100, on DeepSpeed's reduction stream
    (BENCHMARKS.md); the gradients stay in the tensors autograd wrote, which the step reads as it read
    their copies. False (nothing done) without contiguous gradients, with offload or an fp32 accumulation
    buffer, where DeepSpeed takes other paths."""
    if (type(optimizer) is not DeepSpeedZeroOptimizer or not optimizer.contiguous_gradients or optimizer.cpu_offload
            or any(optimizer._use_compact_grad_partition_buffer(i) for i in range(len(optimizer.bit16_groups)))):
        return False
    deepspeed_copy = optimizer.copy_grads_in_partition
    optimizer.copy_grads_in_partition = lambda param, group_idx=None: _copy_grads_in_partition(
        optimizer, deepspeed_copy, param, group_idx)
    return True
