"""The gradient norm of DeepSpeed ZeRO-1/2's step, in fewer passes and without waiting on the GPU.

Replaces (deepspeed 0.19.8, deepspeed/runtime/zero/stage_1_and_2.py, on one DeepSpeedZeroOptimizer):
get_grad_norm_direct, scaled_global_norm and check_overflow. Guarded by tests/unit/fastpath/test_grad_norm.py
(equal to DeepSpeed's fp64 norm; a NaN gradient still skips the step).

Before Adam, DeepSpeed 0.19.8's bf16 ZeRO step reads every gradient three more times than it needs to: it
copies each gradient to fp64 and takes the norm of the copy (for clipping), and runs an amax and an amin
over it (looking for inf/NaN). Here the norm is accumulated in fp32 straight from the bf16 gradients,
and non-finite gradients are found from that norm: an inf or NaN anywhere makes the norm non-finite, which
DeepSpeed's own step already treats as an overflow, so the update is skipped exactly as before. (A norm
beyond fp32's range, above 1.8e19, now also skips the step, where fp64 would have clipped it.)

It covers every parameter group in one pass without waiting on the GPU (_global_grad_norm), and gradients
reduced where autograd wrote them have theirs taken during the backward (norm_in_backward, called by
zero_step's gradient hook).
"""
from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer, combine_grad_norm_groups

from .applied import Applied
from .state import ZeroState

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

REPLACES = "DeepSpeedZeroOptimizer.get_grad_norm_direct, .scaled_global_norm, .check_overflow"
# Gradients at least this large get a reduction kernel of their own (bf16 read and accumulated in fp32 without a
# copy): torch._foreach_norm's chunked kernel reads one expert weight's 400 MB gradient well below the memory
# bandwidth (docs/benchmark-history.md, 2026-12-03); the many small ones still go in one foreach launch.
LARGE_GRADIENT = 1 << 24
# _square_sums_kernel: elements a program loads at once, and loads a program sums before writing its partial sum
SQUARES_BLOCK, SQUARES_LOADS = 4096, 16


if triton is not None:
    @triton.jit
    def _square_sums_kernel(grad_ptr, partial_ptr, numel, BLOCK: tl.constexpr, LOADS: tl.constexpr):
        program = tl.program_id(0).to(tl.int64)
        total = tl.zeros((BLOCK,), tl.float32)
        for load in range(LOADS):
            offsets = (program * LOADS + load) * BLOCK + tl.arange(0, BLOCK)
            values = tl.load(grad_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
            total += values * values
        tl.store(partial_ptr + program, tl.sum(total))


def large_l2_norm(grad: torch.Tensor) -> torch.Tensor:
    """One large gradient's L2 norm in fp32: on the GPU, fp32 sums of squares per program then their sum, a
    streaming read that torch.linalg.vector_norm's reduction (used elsewhere) does not reach."""
    if triton is None or not grad.is_cuda or not grad.is_contiguous():
        return torch.linalg.vector_norm(grad, 2, dtype=torch.float32)
    partials = torch.empty(triton.cdiv(grad.numel(), SQUARES_BLOCK * SQUARES_LOADS), dtype=torch.float32,
                           device=grad.device)
    _square_sums_kernel[(partials.numel(),)](grad, partials, grad.numel(), BLOCK=SQUARES_BLOCK, LOADS=SQUARES_LOADS,
                                             num_warps=8)
    return partials.sum().sqrt()


def l2_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's L2 norm in fp32 (0-dim tensors on its device), the same kernel for a gradient wherever its
    norm is taken, so the step's norm does not depend on where it was."""
    small = [i for i, g in enumerate(grads) if g.numel() < LARGE_GRADIENT]
    norms: list[torch.Tensor | None] = [None] * len(grads)
    for i, norm in zip(small, torch._foreach_norm([grads[i] for i in small], 2, dtype=torch.float32) if small else []):
        norms[i] = norm
    for i, g in enumerate(grads):
        if norms[i] is None:
            norms[i] = large_l2_norm(g)
    return norms


def _fp32_grad_norm(optimizer: DeepSpeedZeroOptimizer, gradients, params, norm_type=2) -> torch.Tensor:
    """DeepSpeed's get_grad_norm_direct for the L2 norm of this rank's gradient partition, reduced over the
    data-parallel group; invalid norms come back as -1, the sentinel DeepSpeed's step checks for."""
    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, gradients, params, norm_type)
    grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    device = torch.device(optimizer.device)
    if grads:
        squares = torch.stack(l2_norms(grads)).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=device)
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    optimizer._model_parallel_all_reduce(tensor=squares, op=dist.ReduceOp.SUM)
    norm = squares.sqrt()
    mask_nan_or_inf_with_val_inplace(norm, device=optimizer.device)
    return norm


def piece_owners(pieces: list[torch.Tensor], params: list) -> list | None:
    """The parameter whose whole gradient each of a ZeRO partition's gradient pieces is (None for padding
    past them), or None where the partition starts or ends inside a parameter."""
    if len(pieces) < len(params) or any(g.numel() != p.numel() for g, p in zip(pieces, params)):
        return None
    return params + [None] * (len(pieces) - len(params))


def _all_reduce_unless_alone(tensor: torch.Tensor, group) -> None:
    if dist.get_world_size(group=group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def _global_grad_norm(state: ZeroState, norm_type=2) -> torch.Tensor:
    """DeepSpeed's scaled_global_norm (L2, no offload, no Muon) computed for all parameter groups at once.

    The same arithmetic: each group's squared gradient norm summed over the data-parallel group, its root
    masked to -1 if not finite, expert groups averaged over their own data-parallel group, the groups
    combined keeping an invalid one invalid. DeepSpeed does it group by group (it splits experts into groups
    of at most ~179M parameters, 3-4 per Qwen3-30B-A3B layer), with an all-reduce per group even on one rank
    and a host-to-device copy of its -1 sentinel that waits for the GPU each time; here one norm pass over
    every gradient whose norm the backward did not already take (norm_in_backward), one all-reduce per
    process group of more than one rank, and no wait."""
    optimizer = state.optimizer
    early, state.early_norms = state.early_norms, {}  # this step's, or none
    if any(optimizer._muon_update_lacks_loss_scale(i) for i in range(len(optimizer.bit16_groups))):
        return DeepSpeedZeroOptimizer.scaled_global_norm(optimizer, norm_type)
    assert float(norm_type) == 2.0, "only the L2 norm"
    norms, owners, grads, slots = [], [], [], []  # norms: one per piece, those still to take left None
    for i in range(len(optimizer.bit16_groups)):
        pieces = [g for g in optimizer.averaged_gradients[i] if not getattr(g, "_zero_padding", False)]
        params = piece_owners(pieces, optimizer.params_in_partition[i]) or [None] * len(pieces)
        for grad, param in zip(pieces, params):
            norms.append(early.get(id(param)) if param is not None else None)
            owners.append(i)
            if norms[-1] is None:
                grads.append(grad.detach())
                slots.append(len(norms) - 1)
    for slot, norm in zip(slots, l2_norms(grads)):
        norms[slot] = norm
    squares = torch.zeros(len(optimizer.bit16_groups), dtype=torch.float32, device=torch.device(optimizer.device))
    if norms:
        squares.index_add_(0, state.device_index("owners", owners), torch.stack(norms).square())
    _all_reduce_unless_alone(squares, optimizer.dp_process_group)
    norms = squares.sqrt()
    norms = torch.where(torch.isfinite(norms), norms, -1.0)  # DeepSpeed's invalid-norm sentinel
    if optimizer.has_moe_layers:  # DeepSpeed's _average_expert_grad_norms, one all-reduce per expert group
        members: dict[int, tuple] = {}
        for i in range(len(optimizer.bit16_groups)):
            if optimizer.is_moe_param_group[i]:
                group = optimizer.real_dp_process_group[i]
                members.setdefault(id(group), (group, []))[1].append(i)
        for group, indices in members.values():
            size = dist.get_world_size(group=group)
            if size > 1:
                index = state.device_index(f"experts {indices}", indices)
                averaged = norms.index_select(0, index) / size
                dist.all_reduce(averaged, op=dist.ReduceOp.SUM, group=group)
                norms = norms.index_copy(0, index, averaged)
    return combine_grad_norm_groups(list(norms.unbind(0)), norm_type=2)


def lean_grad_checks(state: ZeroState) -> Applied:
    """Install the one-pass norm and overflow check on a DeepSpeed ZeRO-1/2 optimizer; refused for any other
    optimizer, or where the step would not compute a norm (nothing to find overflow from)."""
    optimizer = state.optimizer
    refused = ("not DeepSpeed's ZeRO-1/2 optimizer" if type(optimizer) is not DeepSpeedZeroOptimizer
               else "no gradient norm computed" if not optimizer.compute_grad_norm
               else "CPU offload" if optimizer.cpu_offload
               # tensor-parallel duplicates: DeepSpeed's norm filters them
               else "tensor parallelism" if optimizer.model_parallel_world_size > 1 else "")
    if refused:
        return Applied("one_pass_grad_norm", REPLACES, refused)
    optimizer.get_grad_norm_direct = lambda gradients, params, norm_type=2: _fp32_grad_norm(
        optimizer, gradients, params, norm_type)
    optimizer.scaled_global_norm = lambda norm_type=2: _global_grad_norm(state, norm_type)
    state.one_pass_norm = True
    # step() marks an invalid norm as an overflow when check_grad_overflow is set; that check replaces
    # the separate amax/amin pass over every gradient.
    optimizer.check_grad_overflow = True
    optimizer.check_overflow = lambda partition_gradients=True: None
    return Applied("one_pass_grad_norm", REPLACES)


def norm_in_backward(state: ZeroState, param) -> None:
    """Take a final gradient's norm as soon as it is reduced, on DeepSpeed's reduction stream, where it overlaps
    the rest of the backward instead of delaying the step. Final: the accumulation boundary of a run without
    accumulation, in a one-rank group; consumed by the step's norm (_global_grad_norm), which takes the norm
    of any gradient not found here itself."""
    optimizer = state.optimizer
    if (state.one_pass_norm and optimizer.gradient_accumulation_steps == 1
            and optimizer.is_gradient_accumulation_boundary()):
        grad = optimizer.get_param_gradient_attribute(param)
        state.early_norms[id(param)] = l2_norms([grad.detach()])[0]
