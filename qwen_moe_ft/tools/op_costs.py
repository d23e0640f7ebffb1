"""Host and GPU time of one call of the forward's norms (alone and with the residual add before them), RoPE and expert
sort, and of the quack experts' backward de-interleave, for each candidate kernel.

    python -m qwen_moe_ft.tools.op_costs [--tokens 8192] [--calls 20] [--out op_costs.json]

A training step's forward is host-bound: the GPU waits while the host issues the next kernel
(docs/benchmark-history.md, 2026-12-03, commits 62bb9c9..ac09bbf), so an op's host time counts as much as its GPU
time there. To see both sides of one call, the calls are queued behind a ~150 ms sleep kernel, so that neither
side waits on the other: host = the Python loop's wall time per call, GPU = CUDA events around the queued calls,
per call. --calls stays small enough for the queued launches to fit the GPU's launch queue (about a thousand).
Shapes are Qwen3-30B-A3B's (hidden 2048, 32 query / 4 kv heads of 128, top-8 of 128 experts) at --tokens tokens;
norm errors are the largest |difference| / largest |value| of the output and the input gradient against float64.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..fastpath.local_dispatch import expert_order
from ..fastpath.quack_experts import relative_error
from ..bench.harness import markdown_table, require_cuda, tool_parser, write_report

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, INTER = 2048, 32, 4, 128, 128, 8, 768
SLEEP_CYCLES = 300_000_000  # ~150 ms at the H200's ~2 GHz


def queued_cost(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(host us, GPU us) per call of fn, its launches queued behind a sleep kernel."""
    fn()
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    host = (time.perf_counter() - began) / calls * 1e6
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls * 1e3


def rms_norm_errors(norm, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, eps: float = 1e-6) -> dict:
    """Largest relative error of norm(x, weight)'s output and input gradient against float64."""
    x = x.detach().requires_grad_()
    out = norm(x, weight)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    want = weight.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    (dx64,) = torch.autograd.grad(want, x64, grad.double())
    return dict(out_error=relative_error(out, want), dx_error=relative_error(dx, dx64))


def norms() -> dict[str, Callable]:
    """The RMSNorm kernels installed here, each as f(x, weight) with eps 1e-6."""
    found = {"torch": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)}
    try:
        from liger_kernel.ops import LigerRMSNormFunction
        # not in place: the timing loop reuses one output gradient
        found["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False, None)
    except ImportError:
        pass
    try:
        from quack.rmsnorm import rmsnorm
        found["quack"] = lambda x, w: rmsnorm(x, w, eps=1e-6)
    except ImportError:
        pass
    return found


def residual_norms() -> dict[str, Callable]:
    """A residual add followed by the RMSNorm of the sum, each as f(x, residual, weight) -> (normed, sum): torch's
    add then its fused norm, and quack's norm that takes the residual itself, where installed."""
    found = {"torch add + F.rms_norm": lambda x, r, w: _add_then_norm(x, r, w)}
    try:
        from quack.rmsnorm import rmsnorm
        found["quack residual + prenorm"] = lambda x, r, w: rmsnorm(x, w, residual=r, eps=1e-6, prenorm=True)
    except ImportError:
        pass
    return found


def _add_then_norm(x, residual, weight):
    total = x + residual
    return F.rms_norm(total, (total.shape[-1],), weight, 1e-6), total


def ropes() -> dict[str, object]:
    """liger's RoPE implementations usable on this GPU, each resolved once (OpImpl.call(q, k, cos, sin, None, 1))."""
    try:
        from liger_kernel.backends.dispatch import available_impls, resolve_impl
    except ImportError:
        return {}
    return {name: resolve_impl("rope", requested=name) for name in available_impls("rope")}


def measure(tokens: int, calls: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    rows = []

    def row(op, candidate, forward, forward_backward=None, **extra):
        host, gpu = queued_cost(forward, calls)
        entry = dict(op=op, candidate=candidate, host_us=host, gpu_us=gpu, **extra)
        if forward_backward is not None:
            entry["fwd_bwd_host_us"], entry["fwd_bwd_gpu_us"] = queued_cost(forward_backward, calls)
        rows.append(entry)
        print(table([entry], header=not rows[:-1]), flush=True)

    for shape in ((tokens, HIDDEN), (tokens * HEADS, HEAD_DIM)):
        x, weight, grad = randn(*shape).requires_grad_(), randn(shape[-1]).requires_grad_(), randn(*shape)
        for name, norm in norms().items():
            row(f"RMSNorm {shape[0]} x {shape[1]}", name, lambda: norm(x, weight),
                lambda: torch.autograd.backward(norm(x, weight), grad), **rms_norm_errors(norm, x, weight, grad))
    q, k = randn(1, HEADS, tokens, HEAD_DIM).requires_grad_(), randn(1, KV_HEADS, tokens, HEAD_DIM).requires_grad_()
    cos, sin = randn(1, tokens, HEAD_DIM), randn(1, tokens, HEAD_DIM)
    grads = (torch.ones_like(q), torch.ones_like(k))
    for name, impl in ropes().items():
        row("RoPE q + k", f"liger {name}, resolved once", lambda: impl.call(q, k, cos, sin, None, 1),
            lambda: torch.autograd.backward(impl.call(q, k, cos, sin, None, 1), grads))
    x, residual, weight = (randn(*shape).requires_grad_() for shape in ((tokens, HIDDEN), (tokens, HIDDEN), (HIDDEN,)))
    normed_and_sum_grads = (randn(tokens, HIDDEN), randn(tokens, HIDDEN))
    for name, fused in residual_norms().items():
        row(f"residual add + RMSNorm {tokens} x {HIDDEN}", name, lambda: fused(x, residual, weight),
            lambda: torch.autograd.backward(fused(x, residual, weight), normed_and_sum_grads))
    from ..fastpath.quack_experts import split_gate_up, split_gate_up_reference
    interleaved = randn(tokens * TOP_K, 2 * INTER)
    deinterleave = f"gate/up de-interleave {tokens * TOP_K} x {2 * INTER}"
    row(deinterleave, "torch strided copy (before)", lambda: split_gate_up_reference(interleaved))
    row(deinterleave, "split_gate_up (Triton)", lambda: split_gate_up(interleaved),
        exact=bool(torch.equal(split_gate_up(interleaved), split_gate_up_reference(interleaved))))
    selected = torch.randint(0, EXPERTS, (tokens, TOP_K), device="cuda", generator=g)
    sort = f"stable sort of {tokens * TOP_K} expert ids"
    row(sort, "int64 keys", lambda: torch.argsort(selected.view(-1), stable=True))
    row(sort, "expert_order (uint8 keys)", lambda: expert_order(selected, EXPERTS))
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    def us(value):
        return "" if value is None else f"{value:.1f}"

    cells = []
    for r in rows:
        error = (f"{r['out_error']:.1e} / {r['dx_error']:.1e}" if "out_error" in r
                 else ("bitwise equal" if r["exact"] else "DIFFERS") if "exact" in r else "")
        cells.append((r["op"], r["candidate"], us(r["host_us"]), us(r["gpu_us"]), us(r.get("fwd_bwd_host_us")),
                      us(r.get("fwd_bwd_gpu_us")), error))
    return markdown_table(("op", "candidate", "host us", "GPU us", "fwd+bwd host us", "fwd+bwd GPU us",
                           "error out / dx"), cells, header)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.tools.op_costs", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=20, help="queued calls per measurement")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    require_cuda("op_costs")
    rows = measure(args.tokens, args.calls)
    if args.out:
        write_report(args.out, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
