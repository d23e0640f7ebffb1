"""The experts of a one-rank MoE block on quack-kernels' grouped GEMMs: the token gather folded into the gate/up
GEMM's operand load, SwiGLU into its epilogue, and SwiGLU's backward into the down projection's input-gradient GEMM.

Replaces, with `--expert-kernels auto` (where it runs) or `quack`: the token-row gather
(local_dispatch._GatherTokenRows) and the expert module's forward (expert_mlp.LayoutPreservingGateUp, i.e.
GroupedExperts.forward of deepspeed 0.19.8) inside local_dispatch's EP=1 forward. Guarded by
tests/unit/fastpath/test_quack_experts.py (the experts' output and the gradients of the tokens and of the three
weights against the torch chain's, GPU; the refusals, CPU) and measured by `python -m
qwen_moe_ft.tools.expert_kernels`.

These are the kernels sonic-moe builds on (quack.gemm_interface: gemm_gated, gemm_dgated, varlen grouped GEMMs
with a gathered operand). Their gated epilogue works on gate/up columns interleaved ([g0, u0, g1, u1, ...]): the
concatenated weights are read as such (concat_layout), and the pre-activation gradient is de-interleaved once so
that each weight gradient comes out as one grouped GEMM in its parameter's own [E, out, in] layout. That copy is
split_gate_up's Triton kernel, which reads and writes whole rows: torch's strided copy of the same view reads every
other element and runs at about a third of the memory bandwidth. On Hopper four of the GEMMs run pinned tile
configs (HOPPER_CONFIGS) and the gate/up GEMM quack's dynamic tile scheduler (HOPPER_DYNAMIC); quack's gemm() takes
no config, so those go through gemm_tuned.fn, the function its own untuned path calls (_gemm): an internal of quack
0.6.5, hence the exact version check, and the GPU test runs the chain pinned and unpinned.

With quack_scored_combine (left out by default: slower in the step, docs/benchmark-history.md, 5a01695) the
combine moves into the chain too (scored_gathered_swiglu_experts, replacing deepspeed's fused_weighted_restore after
it): the routing scores and their gradient go into SwiGLU's backward GEMM epilogue (quack's colvec scale and reduce)
and the tokens' output gradient is gathered in the GEMMs' operand loads, so no expert output row is kept for the
backward and none of their gradients is written.

Where quack's version and the GPU suit, `probe` still runs the chain once at start (a few rows at the experts' own
widths, forward and backward, checked against a plain float32 chain), since an install quack cannot compile on fails
only when a kernel is first built, and one that computes something else fails nowhere:
quack-kernels 0.6.2 to 0.6.5 fingerprint each epilogue's Python globals and take code outside a `site-packages` or
`dist-packages` folder (e.g. `pip install --target DIR`) for user code, so nvidia-cutlass-dsl installed there raises
TypeError (4.8's `_LOC_TRANSFORMS` ContextVar, 4.7's logger) in quack.epilogue.library's import.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from importlib.metadata import version

import torch

from .token_rows import row_positions, sum_token_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: quack's path needs a GPU anyway
    triton = None

# gemm_gated / gemm_dgated's interleaved gate/up contract and concat_layout, and rmsnorm, as read here
QUACK_VERSION = "0.6.5"


def quack_unavailable_because(device: torch.device) -> str:
    """Empty if quack's kernels (this version, a Hopper or newer GPU) run here, else why not."""
    if importlib.util.find_spec("quack") is None:
        return "quack-kernels is not installed (pip install 'qwen-moe-ft[flash4]')"
    if (installed := version("quack-kernels")) != QUACK_VERSION:
        return f"written for quack-kernels {QUACK_VERSION}, found {installed}"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "quack's kernels need a Hopper or newer GPU"
    return ""


def unavailable_because(device: torch.device, activation: str) -> str:
    """Empty if this path can run here, else why not."""
    if why := quack_unavailable_because(device):
        return why
    if activation != "swiglu":
        return f"the experts' activation is {activation!r}; the fused epilogue here is SwiGLU"
    return ""


def split_gate_up_reference(interleaved: torch.Tensor) -> torch.Tensor:
    """[g0, u0, g1, u1, ...] per row -> [g0, g1, ..., u0, u1, ...], as torch's strided copy."""
    rows, width = interleaved.shape
    return interleaved.view(rows, width // 2, 2).transpose(1, 2).reshape(rows, width)


if triton is not None:
    @triton.jit
    def _split_gate_up_kernel(src_ptr, dst_ptr, rows, inter, BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        pair = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
        src_col = tl.program_id(1) * 2 * BLOCK_PAIRS + tl.arange(0, 2 * BLOCK_PAIRS)
        base = row.to(tl.int64)[:, None] * (2 * inter)
        both = tl.load(src_ptr + base + src_col[None, :], mask=(row < rows)[:, None] & (src_col < 2 * inter)[None, :])
        gate, up = tl.split(tl.reshape(both, (BLOCK_ROWS, BLOCK_PAIRS, 2)))
        inside = (row < rows)[:, None] & (pair < inter)[None, :]
        tl.store(dst_ptr + base + pair[None, :], gate, mask=inside)
        tl.store(dst_ptr + base + inter + pair[None, :], up, mask=inside)


def split_gate_up(interleaved: torch.Tensor) -> torch.Tensor:
    """split_gate_up_reference's result, read and written a row block at a time on the GPU."""
    rows, width = interleaved.shape
    if triton is None or not interleaved.is_cuda or not interleaved.is_contiguous() or rows == 0:
        return split_gate_up_reference(interleaved)
    out = torch.empty_like(interleaved)
    block_rows, block_pairs = 16, min(128, triton.next_power_of_2(width // 2))
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(width // 2, block_pairs))
    _split_gate_up_kernel[grid](interleaved, out, rows, width // 2, BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs,
                                num_warps=4)
    return out


# The tile configs quack's autotuner picked for four of the chain's GEMMs on an H200 at Qwen3-30B-A3B's shape (8192
# tokens, top-8 of 128 experts, hidden 2048, expert width 768), where they beat quack's defaults; the gate/up GEMM and
# w2's gradient kept theirs. Autotuning keys on the row count, which changes with every packed batch, so it cannot run
# in training; a pinned tile shape is valid at any row count. (docs/benchmark-history.md, 2026-12-03,
# commits dd1a20d..3640221.)
HOPPER_CONFIGS = {
    "down": dict(tile_m=128, tile_n=208, pingpong=True, cluster_m=1, cluster_n=2),
    "swiglu_backward": dict(tile_m=128, tile_n=128, pingpong=True, cluster_m=1, cluster_n=2),
    "gate_up_weight_grads": dict(tile_m=128, tile_n=256, pingpong=False, cluster_m=2, cluster_n=1),
    "input_grads": dict(tile_m=192, tile_n=128, pingpong=True, cluster_m=1, cluster_n=2),
}
# GEMMs that keep quack's default tile config on Hopper but hand its tiles out at run time (quack's dynamic persistent
# scheduler): the gate/up GEMM, whose gathered rows make its tiles' times uneven, ran 850 against 936 us at that shape
# on an H100 80GB (docs/benchmark-history.md, 5a01695). The same tiles computed in another order: results unchanged.
HOPPER_DYNAMIC = frozenset({"gate_up"})


@dataclass(frozen=True)
class GemmOptions:
    """How quack picks its GEMM kernels: pinned=True takes HOPPER_CONFIGS and HOPPER_DYNAMIC on a Hopper GPU and
    quack's default elsewhere; tuned=True autotunes each new problem shape instead (seconds to minutes, once a shape;
    packed batches change the row count from step to step); dynamic_scheduler hands tiles to CTAs at run time
    instead of in a fixed order (uneven experts); None leaves each GEMM quack's own default (on for gemm_dgated, off
    for the others) but for HOPPER_DYNAMIC's where pinned."""
    pinned: bool = True
    tuned: bool = False
    dynamic_scheduler: bool | None = None

    def kwargs(self, role: str, device: torch.device) -> dict:
        """gemm/gemm_gated/gemm_dgated keyword arguments for the GEMM playing `role` (a HOPPER_CONFIGS key or
        another name)."""
        scheduler = {} if self.dynamic_scheduler is None else dict(dynamic_scheduler=self.dynamic_scheduler)
        if self.pinned and not self.tuned:
            if (config := _hopper_config(role, device.index)) is not None:
                return dict(config=config, **scheduler)
            if not scheduler and role in HOPPER_DYNAMIC and device.type == "cuda" and _is_hopper(device.index):
                scheduler = dict(dynamic_scheduler=True)
        return dict(tuned=self.tuned, **scheduler)


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int | None) -> bool:
    """Once per device: the experts' GEMMs are issued from the host-bound forward."""
    return torch.cuda.get_device_capability(device_index)[0] == 9


@functools.lru_cache(maxsize=None)
def _hopper_config(role: str, device_index: int | None):
    """HOPPER_CONFIGS[role] as quack's GemmConfig on a Hopper GPU, else None (once per role and device)."""
    if role not in HOPPER_CONFIGS or not _is_hopper(device_index):
        return None
    from quack.gemm_config import GemmConfig

    return GemmConfig(**HOPPER_CONFIGS[role], is_dynamic_persistent=False, device_capacity=9)


DEFAULT_GEMMS = GemmOptions()


def _gemm(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, config=None, **kwargs) -> torch.Tensor:
    """quack.gemm_interface.gemm, with a pinned tile config where one is given. gemm() takes none: its own untuned
    eager path calls gemm_tuned.fn(..., config=None) once it has allocated the output and returned early on empty
    inputs; this does the same with the config."""
    from quack.gemm_interface import gemm, gemm_tuned

    if config is None or A.numel() == 0 or (out is not None and out.numel() == 0):
        return gemm(A, B, out=out, **kwargs)  # empty inputs: quack launches nothing, so nothing to pin
    if out is None:  # only the varlen-M GEMMs here come without an output
        out = A.new_empty(A.shape[0], B.shape[-1])
    gemm_tuned.fn(A, B, out, config=config, **kwargs)
    return out


def _experts_forward(x, w13, w2, token_of_row, cu_seqlens, gemms: GemmOptions):
    """(SwiGLU's pre-activation, interleaved, kept for the backward; the expert output of each row)."""
    from quack.gemm_interface import gemm_gated

    preact, h = gemm_gated(x, w13.transpose(-2, -1), activation="swiglu", cu_seqlens_m=cu_seqlens,
                           A_idx=token_of_row, concat_layout=("B",), **gemms.kwargs("gate_up", x.device))
    return preact, _gemm(h, w2.transpose(-2, -1), cu_seqlens_m=cu_seqlens, **gemms.kwargs("down", x.device))


class _GatheredSwigluExperts(torch.autograd.Function):
    """down(SwiGLU(x[token_of_row] @ [w1; w3]^T)) per expert's rows (cu_seqlens: cumulative row counts from 0);
    w13: cat([w1, w3], dim=1), built or cached by the caller."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, w13, token_of_row, rows, cu_seqlens, top_k, gemms):
        preact, expert_rows = _experts_forward(x, w13, w2, token_of_row, cu_seqlens, gemms)
        ctx.save_for_backward(x, w13, w2, token_of_row, rows, cu_seqlens, preact)
        ctx.top_k, ctx.gemms = top_k, gemms
        return expert_rows

    @staticmethod
    def backward(ctx, dy):
        from quack.gemm_interface import gemm_dgated

        x, w13, w2, token_of_row, rows, cu_seqlens, preact = ctx.saved_tensors
        options, device = ctx.gemms, dy.device
        dy = dy.contiguous()
        # dpreact: interleaved like preact; h: SwiGLU's output again, for w2's gradient
        dpreact, h = gemm_dgated(dy, w2, PreAct=preact, activation="swiglu", cu_seqlens_m=cu_seqlens,
                                 **options.kwargs("swiglu_backward", device))
        dw2 = torch.empty_like(w2)
        _gemm(dy.t(), h, out=dw2, cu_seqlens_k=cu_seqlens, **options.kwargs("down_weight_grad", device))
        dx, dw1, dw3 = _gate_up_grads(dpreact, x, w13, token_of_row, rows, cu_seqlens, ctx.top_k, options)
        return dx, dw1, dw2, dw3, None, None, None, None, None, None


def _gate_up_grads(dpreact, x, w13, token_of_row, rows, cu_seqlens, top_k, options):
    """The tokens' gradient and w1's and w3's from the gate/up pre-activation's (interleaved, as gemm_dgated gives
    it): de-interleaved once, so that each weight gradient is one grouped GEMM in its parameter's own layout."""
    experts, inter, hidden = w13.shape[0], w13.shape[1] // 2, w13.shape[2]
    device = dpreact.device
    dgate_up = split_gate_up(dpreact)  # [g..., u...] per row
    dw1, dw3 = (w13.new_empty(experts, inter, hidden) for _ in range(2))
    for dw, half in ((dw1, dgate_up[:, :inter]), (dw3, dgate_up[:, inter:])):
        _gemm(x.t(), half, out=dw.transpose(-2, -1), cu_seqlens_k=cu_seqlens, A_idx=token_of_row,
              **options.kwargs("gate_up_weight_grads", device))
    drows = _gemm(dgate_up, w13, cu_seqlens_m=cu_seqlens, **options.kwargs("input_grads", device))
    # the rows' inverse permutation is built here, not in the forward, whose host time the GPU waits for
    dx = sum_token_rows(drows, row_positions(rows), top_k)
    return dx, dw1, dw3


class _GatheredScoredSwigluExperts(torch.autograd.Function):
    """Each token's output: the sum over its top_k rows of the row's routing score times
    down(SwiGLU(x[token] @ [w1; w3]^T)), the combine inside the chain. The forward weights and sums the rows as
    AutoEP's fused_weighted_restore does (float32 products, one rounding) and keeps no expert output row. The
    backward never writes the rows' output gradient: SwiGLU's backward GEMM loads the tokens' gradient through the
    rows' token index, applies each row's score in its epilogue and reduces the score's gradient there
    (<d output, row output> = <dout @ w2, SwiGLU>), and w2's gradient GEMM loads the same gathered rows against
    the score-scaled SwiGLU output that epilogue writes. quack requires cluster_n 1 for a gathered operand, so
    SwiGLU's backward runs quack's own config here, not HOPPER_CONFIGS' (cluster_n 2)."""

    @staticmethod
    def forward(ctx, x, top_scores, w1, w2, w3, w13, token_of_row, rows, cu_seqlens, top_k, gemms):
        from deepspeed.ops.triton_ops import autoep_fused_token_ops

        preact, expert_rows = _experts_forward(x, w13, w2, token_of_row, cu_seqlens, gemms)
        output = autoep_fused_token_ops.fused_weighted_restore(expert_rows, top_scores, rows, top_k,
                                                               (1, x.shape[0], x.shape[1]))
        ctx.save_for_backward(x, top_scores, w13, w2, token_of_row, rows, cu_seqlens, preact)
        ctx.top_k, ctx.gemms = top_k, gemms
        return output.view(x.shape[0], x.shape[1])

    @staticmethod
    def backward(ctx, dout):
        from quack.gemm_interface import gemm_dgated

        x, top_scores, w13, w2, token_of_row, rows, cu_seqlens, preact = ctx.saved_tensors
        options, device = ctx.gemms, dout.device
        dout = dout.contiguous()
        # float32: quack loads the scores with 32-bit-aligned copies from each expert's offset
        row_scores = top_scores.reshape(-1).index_select(0, rows).float()
        dpreact, h_scored, drow_scores = gemm_dgated(
            dout, w2, PreAct=preact, activation="swiglu", colvec_scale=row_scores, colvec_reduce=True,
            cu_seqlens_m=cu_seqlens, A_idx=token_of_row, **options.kwargs("swiglu_backward_gathered", device))
        dw2 = torch.empty_like(w2)
        _gemm(dout.t(), h_scored, out=dw2, cu_seqlens_k=cu_seqlens, A_idx=token_of_row,
              **options.kwargs("down_weight_grad", device))
        dscores = torch.empty(top_scores.numel(), dtype=top_scores.dtype, device=device)
        dscores[rows] = drow_scores.to(top_scores.dtype)
        dx, dw1, dw3 = _gate_up_grads(dpreact, x, w13, token_of_row, rows, cu_seqlens, ctx.top_k, options)
        return dx, dscores.view_as(top_scores), dw1, dw2, dw3, None, None, None, None, None, None


def gathered_swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, rows: torch.Tensor,
                            num_tokens_per_expert: torch.Tensor, top_k: int,
                            w13: torch.Tensor | None = None, gemms: GemmOptions = DEFAULT_GEMMS) -> torch.Tensor:
    """The experts' output for each routed row, in expert order. x: [tokens, H]; rows: the (token, slot) pairs
    sorted by expert (token = row // top_k); w1/w3: [E, I, H], w2: [E, H, I]."""
    return _GatheredSwigluExperts.apply(x, w1, w2, w3, *_chain_inputs(w1, w3, w13, rows, num_tokens_per_expert, top_k),
                                        gemms)


def _chain_inputs(w1, w3, w13, rows, num_tokens_per_expert, top_k: int) -> tuple:
    """(w13, token_of_row, rows, cu_seqlens, top_k) as the chains' autograd functions take them: w13 built where the
    caller has no cache, each row's token, the experts' cumulative row counts from 0."""
    cu_seqlens = torch.zeros(num_tokens_per_expert.numel() + 1, dtype=torch.int32, device=rows.device)
    torch.cumsum(num_tokens_per_expert, 0, out=cu_seqlens[1:])
    w13 = torch.cat([w1, w3], dim=1) if w13 is None else w13
    return w13, (rows // top_k).to(torch.int32), rows, cu_seqlens, top_k


def scored_gathered_swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                                   rows: torch.Tensor, num_tokens_per_expert: torch.Tensor, top_k: int,
                                   top_scores: torch.Tensor, w13: torch.Tensor | None = None,
                                   gemms: GemmOptions = DEFAULT_GEMMS) -> torch.Tensor:
    """Each token's output [tokens, H]: its rows' expert outputs weighted by `top_scores` ([tokens, top_k], slot k
    of token t for row t * top_k + k) and summed; the arguments otherwise gathered_swiglu_experts'."""
    return _GatheredScoredSwigluExperts.apply(x, top_scores, w1, w2, w3,
                                              *_chain_inputs(w1, w3, w13, rows, num_tokens_per_expert, top_k), gemms)


MAX_REASON = 240  # the startup line names the failure; the whole message is the exception's


def first_error(run) -> str:
    """Empty if `run()` completes, else its exception's type and first line (at most MAX_REASON characters)."""
    try:
        run()
    except Exception as error:  # whatever quack or its compiler raises, the fallback is the same
        line = next(iter(str(error).strip().splitlines()), "")
        reason = f"{type(error).__name__}: {line}" if line else type(error).__name__
        return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."
    return ""


# The probe's bound on each result's largest difference from float32, as a fraction of its largest value: bf16
# rounds the pre-activations, SwiGLU's output and each result once (2**-8 relative each; the bf16 torch chain is off
# by 0.3-0.9% at Qwen3-30B-A3B's widths); a kernel that reads the wrong rows, halves or scores is off by the values
# themselves.
PROBE_TOLERANCE = 5e-2


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """got's largest difference from want, as a fraction of want's largest magnitude."""
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _float32_chain(x, w1, w2, w3, rows, counts, top_k: int, top_scores=None) -> torch.Tensor:
    """The chain the probe checks against, written plainly: each expert's rows (rows // top_k is the token) through
    SwiGLU one expert at a time in float32; with top_scores, each token's rows weighted and summed."""
    tokens_of, outputs, start = rows // top_k, [], 0
    for expert, count in enumerate(counts.tolist()):
        xs = x.float()[tokens_of[start:start + count]]
        h = torch.nn.functional.silu(xs @ w1[expert].float().t()) * (xs @ w3[expert].float().t())
        outputs.append(h @ w2[expert].float().t())
        start += count
    expert_rows = torch.cat(outputs)
    if top_scores is None:
        return expert_rows
    by_slot = torch.zeros_like(expert_rows).index_copy(0, rows, expert_rows)
    return (by_slot.view(-1, top_k, by_slot.shape[1]) * top_scores.float().unsqueeze(-1)).sum(1)


def probe(device: torch.device, hidden: int, inter: int, dtype: torch.dtype, gemms: GemmOptions = DEFAULT_GEMMS,
          scored: bool = False) -> str:
    """Empty if the chain's kernels (gate/up + SwiGLU, down, SwiGLU's backward, the weight and input gradients) run
    here and agree with float32 (_float32_chain, within PROBE_TOLERANCE), else why not: one forward and backward of
    8 rows over 2 experts at the experts' widths, which builds the kernels that training then uses; `scored`: the
    chain with the combine inside (scored_gathered_swiglu_experts). Draws from its own generator: the run's random
    stream stays as it was."""
    def run():
        g = torch.Generator(device=device).manual_seed(0)
        experts, top_k, tokens = 2, 2, 4
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
        w1, w3 = (torch.randn(experts, inter, hidden, device=device, dtype=dtype, generator=g) * hidden ** -0.5
                  for _ in range(2))
        w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype, generator=g) * inter ** -0.5
        rows = torch.arange(tokens * top_k, device=device).view(tokens, top_k).t().reshape(-1)  # expert 0's, then 1's
        counts = torch.full((experts,), tokens, device=device, dtype=torch.int64)
        scores = torch.rand(tokens, top_k, device=device, generator=g) if scored else None
        names = ("output", "x", "w1", "w2", "w3") + (("scores",) if scored else ())

        def results(chain, dtype):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w1, w2, w3)]
            if scored:
                leaves.append(scores.detach().clone().requires_grad_())
                out = chain(*leaves[:4], rows, counts, top_k, leaves[4])
            else:
                out = chain(*leaves, rows, counts, top_k)
            return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

        quack_chain = scored_gathered_swiglu_experts if scored else gathered_swiglu_experts
        got = results(lambda *args: quack_chain(*args, gemms=gemms), dtype)
        want = results(_float32_chain, torch.float32)
        for name, a, b in zip(names, got, want):  # reading the values waits for the kernels
            if not torch.isfinite(a).all():
                raise FloatingPointError(f"quack's expert chain gave non-finite values ({name})")
            error = relative_error(a, b)
            if error > PROBE_TOLERANCE:
                raise ArithmeticError(f"quack's expert chain is off by {error:.2g} of the largest value in {name}, "
                                      f"over the {PROBE_TOLERANCE} bf16 allows")

    return first_error(run)
