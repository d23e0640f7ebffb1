"""Packed causal attention on the GPU: each installed backend checked against per-document sdpa, then timed.

    python -m qwen_moe_ft.tools.attention_table [--tokens 8192] [--lengths full,chat] [--out attention.json]

Qwen3-30B-A3B's attention shape (32 query heads, 4 kv heads, head dim 128, bf16). For each length mix (the
benchmark's fixed-seed document lengths) and backend: forward+backward time (median of --iters after warm-up)
and TFLOP/s counting only the causal half of each document's scores; and the largest error of the output and of
the q/k/v gradients relative to the largest magnitude, against per-document sdpa computed in float32.
`cudnn` is the dense causal batch through sdpa that equal-length documents take; it runs on full-length
documents only.
"""
from __future__ import annotations

import random
import statistics

import torch

from ..model.attention import _KERNELS, _equal_documents, _per_document_sdpa, available_backends
from ..bench.benchmark import document_lengths
from ..bench.harness import markdown_table, require_cuda, time_ms, tool_parser, write_report

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


def attention_flops(lengths: list[int]) -> float:
    """Forward+backward matmul FLOPs of causal attention: QK^T and PV forward (2 x 2 x n^2/2 x d per head),
    the backward 2.5 times that (dV, dP, dQ, dK and the recomputed scores)."""
    forward = sum(2 * 2 * n * n / 2 * HEAD_DIM * HEADS for n in lengths)
    return 3.5 * forward


def inputs(lengths: list[int], seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)

    def make(heads):
        return torch.randn(total, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k, v, grad_out = make(HEADS), make(KV_HEADS), make(KV_HEADS), make(HEADS)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    return q, k, v, grad_out, cu


def kernel_of(backend: str, lengths: list[int]):
    if backend == "cudnn":
        n_docs = len(lengths)
        return lambda q, k, v, cu, max_len, scale: _equal_documents(q, k, v, n_docs, scale)
    return _KERNELS[backend]


def forward_backward(kernel, q, k, v, grad_out, cu, max_len):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = kernel(q, k, v, cu, max_len, HEAD_DIM ** -0.5)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def errors(results, reference) -> dict[str, float]:
    return {name: float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for name, a, b in zip(("out", "dq", "dk", "dv"), results, reference)}


def measure(lengths: list[int], backends: list[str], iters: int) -> list[dict]:
    q, k, v, grad_out, cu = inputs(lengths)
    max_len = max(lengths)
    reference = forward_backward(_per_document_sdpa, q.float(), k.float(), v.float(), grad_out.float(), cu, max_len)
    rows = []
    for backend in backends:
        kernel = kernel_of(backend, lengths)
        try:
            errs = errors(forward_backward(kernel, q, k, v, grad_out, cu, max_len), reference)
            ms = time_ms(lambda: forward_backward(kernel, q, k, v, grad_out, cu, max_len), iters)
        except Exception as e:  # report a backend that fails here and go on with the others
            rows.append(dict(backend=backend, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        rows.append(dict(backend=backend, fwd_bwd_ms=ms, tflops=attention_flops(lengths) / ms / 1e9,
                         max_rel_err=errs))
    return rows


def table(rows: list[dict]) -> str:
    cells = [(r["backend"], f"failed: {r['error']}", "", "") if "error" in r else
             (r["backend"], f"{r['fwd_bwd_ms']:.3f}", f"{r['tflops']:.0f}",
              " / ".join(f"{r['max_rel_err'][k]:.1e}" for k in ("out", "dq", "dk", "dv"))) for r in rows]
    return markdown_table(("backend", "fwd+bwd ms", "TFLOP/s", "max rel err out / dq / dk / dv"), cells)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.tools.attention_table", __doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--lengths", default="full,chat", help="comma list of the benchmark's length mixes")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="attention.json")
    args = parser.parse_args(argv)
    require_cuda("attention_table")
    tables = {}
    for mix in args.lengths.split(","):
        lengths = document_lengths(args.tokens, mix, random.Random(args.seed))
        backends = [b for b in available_backends("cuda") if b != "sdpa"]
        if len(set(lengths)) == 1:
            backends.append("cudnn")
        rows = measure(lengths, backends + ["sdpa"], args.iters)
        tables[mix] = dict(documents=len(lengths), median_length=statistics.median(lengths), rows=rows)
        print(f"\n{mix}: {len(lengths)} documents, {sum(lengths)} tokens, median length {statistics.median(lengths):.0f}")
        print(table(rows))
    write_report(args.out, tables=tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
