"""Expert MLP and gradient-norm kernels at the Qwen3-30B-A3B shape, on the GPU: each candidate checked, then timed.

    python -m qwen_moe_ft.tools.expert_kernels [--tokens 8192] [--out experts.json]

Expert chain (one layer at EP=1: token rows gathered in expert order, gate/up grouped GEMM, SwiGLU, down
grouped GEMM; the combine is the same for every candidate and left out):
- `torch`: the fast path's chain (fastpath/local_dispatch.py gather, fastpath/expert_mlp.py gate/up GEMM with the
  layout-keeping backward, torch._grouped_mm), SwiGLU as silu(gate) * up (training runs DeepSpeed's packed
  kernel there: one pass fewer, so this chain's time is a little above the trainer's).
- `quack`: fastpath/quack_experts.py (`--expert-kernels quack`): quack-kernels' grouped GEMMs with the gather
  folded into the gate/up GEMM's operand load, SwiGLU into its epilogue and its backward into the down projection's
  input-gradient GEMM (the kernels sonic-moe builds on).
quack's variants: the tile configs and scheduler the fast path pins on Hopper (quack_experts.HOPPER_CONFIGS and
HOPPER_DYNAMIC), quack's own defaults, its dynamic tile scheduler on every GEMM, and with --tune its autotuner (first
call's time reported: the tuning; QUACK_PRINT_AUTOTUNING=1 prints the config it picks for each GEMM, which is how
HOPPER_CONFIGS were found).
(The norms' kernels, with host time as well: `python -m qwen_moe_ft.tools.op_costs`.)
With the combine (`--only combine`): quack's chain followed by AutoEP's weighted combine, what the step runs,
against the chain with the combine inside (`quack_scored_combine`), each against the torch chain and the combine in
float32 (the scores' gradient too).
Gradient norm of one expert weight's gradient: torch._foreach_norm and vector_norm against fastpath.grad_norm.l2_norms.

Error = largest |difference| / largest |value| against the torch chain in float32 (outputs and every gradient).
Times: median of --iters CUDA-event intervals after warm-up.
"""
from __future__ import annotations

import json
import time
import traceback

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from ..fastpath.local_dispatch import expert_order
from ..fastpath.quack_experts import relative_error
from ..bench.harness import require_cuda, time_ms, tool_parser, write_report

HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768


def kernels(fn, iters: int = 5) -> list[tuple[str, float]]:
    """The kernels one call of `fn` launches, in launch order, with their device time in us (mean of `iters` calls,
    torch.profiler): free of the host's launch gaps that small kernels leave between CUDA events."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    launched = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation),
                      key=lambda e: e.time_range.start)
    per_call = len(launched) // iters
    return [(launched[i].name[:90],
             sum(launched[i + k * per_call].time_range.elapsed_us() for k in range(iters)) / iters)
            for i in range(per_call)]


def kernel_ms(fn, iters: int = 5) -> float:
    """Device time of the kernels one call of `fn` launches."""
    return sum(us for _, us in kernels(fn, iters)) / 1000


def routing(tokens: int, seed: int = 0):
    """Random router choices as the fast path orders them: the (token, slot) rows sorted by expert, and each
    expert's row count."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, device="cuda", generator=g)
    selected = logits.topk(TOP_K, dim=-1).indices
    rows = expert_order(selected, EXPERTS)
    counts = torch.bincount(selected.view(-1), minlength=EXPERTS)
    return rows, counts


def weights(dtype, seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) * shape[-1] ** -0.5).to(dtype).requires_grad_()

    return make(EXPERTS, INTER, HIDDEN), make(EXPERTS, HIDDEN, INTER), make(EXPERTS, INTER, HIDDEN)


def gradients(leaves: list[torch.Tensor], dy: torch.Tensor):
    """fn -> [fn()'s output, each leaf's gradient] for the output gradient dy."""
    def run(fn):
        for t in leaves:
            t.grad = None
        y = fn()
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    return run


def torch_chain(x, w1, w2, w3, rows, counts, top_k: int = TOP_K):
    """The fast path's torch chain (see the module docstring)."""
    from ..fastpath.expert_mlp import _GateUpGroupedMm
    from ..fastpath.local_dispatch import _GatherTokenRows

    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    routed = _GatherTokenRows.apply(x, rows, top_k)
    gate_up = _GateUpGroupedMm.apply(routed, w1, w3, offsets, False, None)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)


def combined_torch_chain(x, w1, w2, w3, rows, counts, scores, top_k: int = TOP_K):
    """torch_chain's rows weighted by their tokens' scores ([tokens, top_k]) and summed per token in float32, as
    AutoEP's combine does."""
    expert_rows = torch_chain(x, w1, w2, w3, rows, counts, top_k)
    by_slot = expert_rows.new_zeros(expert_rows.shape).index_copy(0, rows, expert_rows)
    return (by_slot.view(-1, top_k, by_slot.shape[1]).float() * scores.unsqueeze(-1).float()).sum(1).to(x.dtype)


def quack_chain(x, w1, w2, w3, rows, counts, **gemm_options):
    from ..fastpath.quack_experts import GemmOptions, gathered_swiglu_experts

    return gathered_swiglu_experts(x, w1, w2, w3, rows, counts, TOP_K, gemms=GemmOptions(**gemm_options))


# the fast path's GEMM options against quack's defaults (untuned configs, quack's own scheduler choice per GEMM)
QUACK_VARIANTS = {"quack": {}, "quack_defaults": dict(pinned=False),
                  "quack_dynamic": dict(pinned=False, dynamic_scheduler=True)}


def expert_table(tokens: int, iters: int, tune: bool = False) -> dict:
    rows, counts = routing(tokens)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=g).bfloat16().requires_grad_()
    w = weights(torch.bfloat16)
    dy = torch.randn(tokens * TOP_K, HIDDEN, device="cuda", generator=g).bfloat16()
    leaves = [x, *w]
    grads = gradients(leaves, dy)

    x32, w32 = x.detach().float().requires_grad_(), [t.detach().float().requires_grad_() for t in w]
    y32 = torch_chain(x32, *w32, rows, counts)
    y32.backward(dy.float())
    reference = [y32.detach(), x32.grad, *(t.grad for t in w32)]
    del x32, w32, y32

    candidates = {"torch": lambda: torch_chain(x, *w, rows, counts)}
    for name, options in {**QUACK_VARIANTS, **({"quack_tuned": dict(tuned=True)} if tune else {})}.items():
        candidates[name] = lambda options=options: quack_chain(x, *w, rows, counts, **options)
    return measure(candidates, grads, reference, ("out", "dx", "dw1", "dw2", "dw3"), iters)


def measure(candidates: dict, grads, reference: list, names: tuple[str, ...], iters: int) -> dict:
    """Each candidate's error against `reference` (grads(fn): the output and the leaves' gradients), forward and
    forward+backward time and its kernels; a candidate that fails is reported with its error."""
    table = {}
    for name, fn in candidates.items():
        try:
            started = time.perf_counter()
            got = grads(fn)  # the first call compiles (and with tuned=True autotunes) quack's kernels
            first_call_s = time.perf_counter() - started
            errors = dict(zip(names, (relative_error(a, b) for a, b in zip(got, reference))))
            with torch.no_grad():
                forward = time_ms(fn, iters)
            both = time_ms(lambda: grads(fn), iters)
            launched = kernels(lambda: grads(fn))
            table[name] = dict(forward_ms=forward, forward_backward_ms=both, first_call_s=first_call_s,
                               kernels_ms=sum(us for _, us in launched) / 1000, errors=errors,
                               kernels=[(k, round(us, 1)) for k, us in launched if us > 20])
        except Exception as error:  # report and go on: one failing candidate must not hide the others
            table[name] = dict(error=f"{type(error).__name__}: {error}", trace=traceback.format_exc()[-3000:])
        print(name, json.dumps(table[name], indent=None)[:3000], flush=True)
    return table


def weighted_combine(expert_rows: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """AutoEP's combine at EP=1 as the fast path runs it after quack's experts: each token's rows weighted by its
    scores and summed (deepspeed's fused_weighted_restore)."""
    from deepspeed.ops.triton_ops import autoep_fused_token_ops

    tokens, hidden = scores.shape[0], expert_rows.shape[1]
    return autoep_fused_token_ops.fused_weighted_restore(expert_rows, scores, rows, TOP_K,
                                                         (1, tokens, hidden)).view(tokens, hidden)


def combine_table(tokens: int, iters: int) -> dict:
    """The experts with the combine: quack's chain followed by AutoEP's weighted combine (the default step) against
    the chain with the combine inside (quack_scored_combine), both against the torch chain and the combine in
    float32, the scores' gradient included."""
    from ..fastpath.quack_experts import scored_gathered_swiglu_experts

    rows, counts = routing(tokens)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=g).bfloat16().requires_grad_()
    w = weights(torch.bfloat16)
    scores = torch.rand(tokens, TOP_K, device="cuda", generator=g).softmax(-1).requires_grad_()
    dy = torch.randn(tokens, HIDDEN, device="cuda", generator=g).bfloat16()
    leaves = [x, *w, scores]
    grads = gradients(leaves, dy)

    x32, w32 = x.detach().float().requires_grad_(), [t.detach().float().requires_grad_() for t in w]
    s32 = scores.detach().clone().requires_grad_()
    y32 = combined_torch_chain(x32, *w32, rows, counts, s32)
    y32.backward(dy.float())
    reference = [y32.detach(), x32.grad, *(t.grad for t in w32), s32.grad]
    del x32, w32, s32, y32

    candidates = {"quack+combine": lambda: weighted_combine(quack_chain(x, *w, rows, counts), rows, scores),
                  "quack_scored_combine": lambda: scored_gathered_swiglu_experts(x, *w, rows, counts, TOP_K, scores)}
    return measure(candidates, grads, reference, ("out", "dx", "dw1", "dw2", "dw3", "dscores"), iters)


def grad_norm_table(iters: int) -> dict:
    """The step's L2 norm of one expert weight's gradient ([128, 768, 2048] bf16, 403 MB): torch._foreach_norm and
    torch.linalg.vector_norm against the fastpath's l2_norms (grad_norm.large_l2_norm for gradients this large), with
    the bandwidth each reads."""
    from ..fastpath.grad_norm import l2_norms

    grad = torch.randn(EXPERTS, INTER, HIDDEN, device="cuda", dtype=torch.bfloat16)
    want = grad.double().norm().item()
    table = {}
    for name, fn in (("foreach_norm", lambda: torch._foreach_norm([grad], 2, dtype=torch.float32)[0]),
                     ("vector_norm", lambda: torch.linalg.vector_norm(grad, 2, dtype=torch.float32)),
                     ("l2_norms", lambda: l2_norms([grad])[0])):
        ms = kernel_ms(fn, iters)
        table[name] = dict(kernels_ms=ms, tb_per_s=grad.numel() * 2 / ms / 1e9,
                           rel_error=abs(fn().item() - want) / want)
    print("grad_norm", json.dumps(table), flush=True)
    return table


def main(argv=None):
    parser = tool_parser("qwen_moe_ft.tools.expert_kernels", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", choices=("experts", "combine", "grad_norms"), default=None)
    parser.add_argument("--tune", action="store_true", help="also run quack's autotuner on every GEMM (minutes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    require_cuda("expert_kernels")
    result = dict(tokens=args.tokens)
    if args.only in (None, "grad_norms"):
        result["grad_norms"] = grad_norm_table(args.iters)
    if args.only in (None, "experts"):
        result["experts"] = expert_table(args.tokens, args.iters, args.tune)
    if args.only in (None, "combine"):
        result["combine"] = combine_table(args.tokens, args.iters)
    if args.out:
        write_report(args.out, **result)


if __name__ == "__main__":
    main()
