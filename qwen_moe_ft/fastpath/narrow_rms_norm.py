"""RMSNorm over narrow rows (Qwen3's per-head q/k norms: rows of head_dim = 128), forward and backward in Triton.

liger's RMSNorm backward takes ~3x the memory traffic's time on these rows (234 us a layer for the q and k norms of
8192 tokens on an H100, against ~70 us to read x and the gradient and write the input's gradient once): here each
program of the backward walks many row blocks and keeps its share of the weight's gradient in registers, writing one
partial row, summed after. Used where quack's RMSNorm does not run (norms.py); the arithmetic is Qwen3MoeRMSNorm's:
statistics in fp32, the normalised rows rounded to the input's dtype, then multiplied by the weight (one rounding).
The backward runs in fp32 throughout (the stock autograd rounds the normalised rows' gradient to bf16 on the way).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: norms.py keeps the module's own forward
    triton = None

FORWARD_ROWS = 32  # rows a forward program normalises
BACKWARD_ROWS = 32  # rows a backward program takes at once
BACKWARD_PROGRAMS_PER_SM = 4

if triton is not None:
    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, width, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        present = rows < n_rows
        inside = present[:, None] & (cols < width)[None, :]
        offsets = rows[:, None] * width + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + eps)
        normed = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
        tl.store(y_ptr + offsets, (normed * w[None, :]).to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(rstd_ptr + rows, rstd, mask=present)

    @triton.jit
    def _backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, width, programs,
                         blocks_per_program, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, blocks_per_program):  # row blocks program, program + programs, ...; past the end masked
            rows = (program + i * programs).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            present = rows < n_rows
            inside = present[:, None] & (cols < width)[None, :]
            offsets = rows[:, None] * width + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=present, other=0.0)
            x_hat = x * rstd[:, None]
            dw += tl.sum(dy * x_hat.to(dx_ptr.dtype.element_ty).to(tl.float32), axis=0)
            d_hat = dy * w[None, :]
            mean = tl.sum(d_hat * x_hat, axis=1) / width
            dx = rstd[:, None] * (d_hat - x_hat * mean[:, None])
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        tl.store(dw_partial_ptr + program.to(tl.int64) * width + cols, dw, mask=cols < width)


class _NarrowRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rows, width = x.shape
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(width)
        _forward_kernel[(triton.cdiv(rows, FORWARD_ROWS),)](x, weight, y, rstd, rows, width, eps, ROWS=FORWARD_ROWS,
                                                             BLOCK=block, num_warps=4)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        rows, width = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        blocks = triton.cdiv(rows, BACKWARD_ROWS)
        programs = max(1, min(blocks, sms * BACKWARD_PROGRAMS_PER_SM))
        partial = torch.empty(programs, width, dtype=torch.float32, device=x.device)
        _backward_kernel[(programs,)](dy, x, weight, rstd, dx, partial, rows, width, programs,
                                      triton.cdiv(blocks, programs), ROWS=BACKWARD_ROWS,
                                      BLOCK=triton.next_power_of_2(width), num_warps=4)
        return dx, partial.sum(0).to(weight.dtype), None


def supported(x: torch.Tensor) -> bool:
    """Whether narrow_rms_norm runs on x here: a CUDA tensor with triton installed."""
    return triton is not None and x.is_cuda


def narrow_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3MoeRMSNorm over the last dimension of x (any leading shape), weight [width]."""
    width = x.shape[-1]
    return _NarrowRMSNorm.apply(x.reshape(-1, width).contiguous(), weight, eps).view(x.shape)
