"""Time of the one-pass AdamW (fastpath.adamw) over one Qwen3-30B-A3B layer's parameters, as the ZeRO step calls it.

    python -m qwen_moe_ft.tools.adamw_kernel [--iters 10] [--sweep] [--out adamw_kernel.json]

One fp32 partition holding a layer's expert weights (w1 and w3 mirrored into their gate/up concatenation, w2)
and its attention, router and norm weights, with bf16 gradients in one piece per parameter, a bf16 copy written
out and the clip divisor applied: what `zero_step._fused_step` hands `MasterAdamW.update` for one layer at EP=1.
Reports the median time of --iters updates and the memory traffic it implies (bytes the kernel must move: the
gradient, the fp32 weight read and written, both moments read and written, the bf16 copy and the mirror), against
a device-to-device copy of 4 GiB, the bandwidth a streaming kernel can hope for. --sweep also times other
block sizes and warp counts of the Triton kernel, and the update without the gate/up mirror.
"""
from __future__ import annotations

import torch

from ..fastpath import adamw
from ..fastpath.adamw import MasterAdamW, Mirror
from ..bench.harness import markdown_table, require_cuda, time_ms, tool_parser, write_report

HIDDEN, EXPERTS, INTER, HEADS, KV_HEADS, HEAD_DIM = 2048, 128, 768, 32, 4, 128
SWEEP = ((2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16))


def layer_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of one layer, in the order a ZeRO partition holds them (experts first)."""
    return [("w1", (EXPERTS, INTER, HIDDEN)), ("w3", (EXPERTS, INTER, HIDDEN)), ("w2", (EXPERTS, HIDDEN, INTER)),
            ("q_proj", (HEADS * HEAD_DIM, HIDDEN)), ("k_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
            ("v_proj", (KV_HEADS * HEAD_DIM, HIDDEN)), ("o_proj", (HIDDEN, HEADS * HEAD_DIM)),
            ("router", (EXPERTS, HIDDEN)), ("norms", (2 * HIDDEN + 2 * HEAD_DIM,))]


class LayerUpdate:
    """A layer's partition, its optimizer state and gradients; call() runs one update. `shapes` as
    layer_shapes() gives them, w1 and w3 first."""

    def __init__(self, state_dtype: torch.dtype, shapes: list | None = None, device: str = "cuda",
                 mirror: bool = True):
        shapes = shapes or layer_shapes()
        sizes = [torch.Size(shape).numel() for _, shape in shapes]
        self.elements = sum(sizes)
        g = torch.Generator(device=device).manual_seed(0)
        self.master = torch.randn(self.elements, device=device, generator=g) * 0.02
        self.out = torch.empty(self.elements, device=device, dtype=torch.bfloat16)
        self.grads = [torch.randn(n, device=device, generator=g).bfloat16() * 1e-3 for n in sizes]
        experts, inter, hidden = shapes[0][1]
        self.gate_up = torch.empty(experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16)
        self.mirrors = [Mirror(self.gate_up, half=0, block=inter * hidden),
                        Mirror(self.gate_up, half=1, block=inter * hidden)] if mirror else [None, None]
        self.mirrors += [None] * (len(shapes) - 2)
        self.mirrored = mirror
        self.divisor = torch.tensor([1.5], device=device)
        self.adam = MasterAdamW([self.master], lr=1e-4, weight_decay=0.1, state_dtype=state_dtype)
        moment_bytes = 2 * 2 * torch.finfo(state_dtype).bits // 8  # m and v, each read and written
        # gradient, fp32 weight read and written, moments, bf16 copy; the mirror for w1 and w3
        self.bytes = self.elements * (2 + 8 + moment_bytes + 2) + (sizes[0] + sizes[1]) * 2 * mirror

    def __call__(self) -> None:
        self.adam.update(self.adam.param_groups[0], self.master, self.grads, out=self.out, grad_scale=self.divisor,
                         mirrors=self.mirrors)


def copy_bandwidth(iters: int) -> float:
    """TB/s of a 4 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() * 4 / ms / 1e9


def measure(iters: int, sweep: bool) -> list[dict]:
    rows = []
    configured = (adamw.KERNEL_BLOCK, adamw.KERNEL_WARPS)
    variants = [("bf16", torch.bfloat16, True, configured), ("fp32", torch.float32, True, configured)]
    if sweep:
        variants[1:1] = [("bf16", torch.bfloat16, True, c) for c in SWEEP if c != configured]
        variants.append(("bf16", torch.bfloat16, False, configured))
    update = None
    for name, dtype, mirror, (block, warps) in variants:
        if update is None or (update.adam.state_dtype, update.mirrored) != (dtype, mirror):
            update = None  # free the last one's GPU memory first
            update = LayerUpdate(dtype, mirror=mirror)
        adamw.KERNEL_BLOCK, adamw.KERNEL_WARPS = block, warps
        ms = time_ms(update, iters)
        rows.append(dict(moments=name, mirror=mirror, block=block, warps=warps, ms=ms, elements=update.elements,
                         gb=update.bytes / 1e9, tb_per_s=update.bytes / ms / 1e9,
                         configured=(block, warps) == configured))
        print(table(rows[-1:], header=len(rows) == 1), flush=True)
    adamw.KERNEL_BLOCK, adamw.KERNEL_WARPS = configured
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    cells = []
    for r in rows:
        mark = " (configured)" if r["configured"] else ""
        moments = r["moments"] + ("" if r.get("mirror", True) else ", no gate/up mirror")
        cells.append((moments, f"{r['block']} x {r['warps']}{mark}", f"{r['ms']:.3f}", f"{r['gb']:.2f}",
                      f"{r['tb_per_s']:.2f}"))
    return markdown_table(("moments", "block x warps", "ms a layer", "GB moved", "TB/s"), cells, header)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.tools.adamw_kernel", __doc__)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="also time other block sizes and warp counts")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    require_cuda("adamw_kernel")
    if adamw.triton is None:
        raise SystemExit("error: adamw_kernel times a Triton kernel, and triton is not installed")
    rows = measure(args.iters, args.sweep)
    copy = copy_bandwidth(args.iters)
    print(f"device-to-device copy of 4 GiB: {copy:.2f} TB/s", flush=True)
    if args.out:
        write_report(args.out, copy_tb_per_s=copy, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
