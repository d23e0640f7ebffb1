"""Qwen3's RMSNorm in Triton, forward and backward, for the per-head q/k norms and the hidden-size norms.

The backward is one pass: each program walks many row blocks, writing the input's gradient and keeping its share of
the weight's gradient in registers, one partial row summed after. On the q/k norms' 128-wide rows liger's backward
took ~3x the memory traffic's time (234 us a layer for 8192 tokens on an H100); on the hidden-size rows torch's
fused RMSNorm backward reads x and the gradient twice, once for each gradient (docs/benchmark-history.md,
2026-12-06). The arithmetic is Qwen3MoeRMSNorm's: statistics in fp32, the normalised rows rounded to the input's
dtype, then multiplied by the weight (one rounding); the backward runs in fp32 throughout (the stock autograd rounds
the normalised rows' gradient to bf16 on the way).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: norms.py keeps the module's own forward
    triton = None

BLOCK_ELEMENTS = 4096  # elements a program holds at once: 32 rows of 128, 2 of 2048
BACKWARD_PROGRAMS_PER_SM = 4
MAX_WIDTH = 16384  # wider rows would not fit one block's registers; norms.py keeps the stock norm there

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


def _blocks(width: int) -> tuple[int, int]:
    """(rows a program takes at once, the row's block of columns) for rows of `width`."""
    block = triton.next_power_of_2(width)
    return max(1, BLOCK_ELEMENTS // block), block


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rows, width = x.shape
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        per_program, block = _blocks(width)
        _forward_kernel[(triton.cdiv(rows, per_program),)](x, weight, y, rstd, rows, width, eps, ROWS=per_program,
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
        per_program, block = _blocks(width)
        blocks = triton.cdiv(rows, per_program)
        programs = max(1, min(blocks, sms * BACKWARD_PROGRAMS_PER_SM))
        partial = torch.empty(programs, width, dtype=torch.float32, device=x.device)
        _backward_kernel[(programs,)](dy, x, weight, rstd, dx, partial, rows, width, programs,
                                      triton.cdiv(blocks, programs), ROWS=per_program, BLOCK=block, num_warps=4)
        return dx, partial.sum(0).to(weight.dtype), None


def unavailable_because(device: torch.device, width: int) -> str:
    """Empty where rms_norm runs on rows of `width` on `device`, else why not."""
    if triton is None or device.type != "cuda":
        return "needs a GPU and triton"
    return f"rows of {width} are wider than {MAX_WIDTH}" if width > MAX_WIDTH else ""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3MoeRMSNorm over the last dimension of x (any leading shape), weight [width]."""
    width = x.shape[-1]
    return _RMSNorm.apply(x.reshape(-1, width).contiguous(), weight, eps).view(x.shape)
