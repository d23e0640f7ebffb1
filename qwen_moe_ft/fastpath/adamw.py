"""AdamW on fp32 master weights in one pass: bf16 gradients in, bf16 weights out, bf16 or fp32 moments.

Stands in for the torch AdamW that DeepSpeed's ZeRO optimizer wraps (zero_step.fuse_adam_step). Guarded by
tests/unit/fastpath/test_adamw.py (fp32 moments equal to torch's AdamW; bf16 moments unbiased).

Why: DeepSpeed's bf16 ZeRO-2 step copies the bf16 gradient partition to fp32, runs Adam over fp32 master
weights and two fp32 moments, then copies the master weights back to bf16: 44 bytes of memory traffic per
parameter over four passes.
`update` reads the bf16 gradient where ZeRO left it and writes the bf16 weight in the same pass. With
bf16 moments (the default, as DeepSeek-V3 trains: fp32 master weights, bf16 AdamW moments) a parameter
costs 20 bytes of traffic and 4 fewer bytes of memory; with the master kept as the bf16 weight and its low 16 bits
(`low`, master_bits.py) 18 bytes and 2 fewer again. With the bf16 weight as the master (`round_out`,
--master-weights bf16) 14 bytes and 2 fewer again, at the cost of exactness: each update is computed in fp32 and
rounded to bf16 stochastically, so it is right on average but not the fp32 master's to the bit.

The moments are rounded to bf16 stochastically (unbiased): with round-to-nearest an EMA whose per-step
change is below half a bf16 ulp (0.2%) would never move, e.g. v under beta2 = 0.999. The update itself
uses the fp32 moments of this step, so only what is carried to the next step is rounded. The random bits
come from the step, the parameter group and the position in the partition, so a resumed run repeats the
uninterrupted one exactly.

On CUDA with Triton the pass is one kernel; elsewhere (the CPU tests) the same arithmetic in torch ops.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .master_bits import join_master, split_master

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below
    triton = None

STATE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_TORCH_CHUNK = 1 << 24  # elements per torch-path chunk: bounds its fp32 temporaries
# Gradients below _SMALL elements (norm weights, attention projections) are concatenated, up to _RUN
# elements at a time, and updated in one launch: one kernel each left the GPU idle while the host launched
# the next.
_SMALL, _RUN = 1 << 22, 1 << 25
KERNEL_BLOCK, KERNEL_WARPS = 4096, 8  # elements and warps per program of the Triton kernel


@dataclass(frozen=True)
class Mirror:
    """A second place a gradient piece's new weights go, in another layout: element j of the piece's
    parameter (counted from `start`) goes to dst.view(-1)[j + (j // block + half) * block], one half of a
    tensor that interleaves two parameters in rows of `block` elements. The gate/up concatenation
    [E, 2I, H] of w1 and w3 ([E, I, H] each): block = I * H, half 0 for w1, 1 for w3."""
    dst: torch.Tensor
    half: int
    block: int
    start: int = 0


def _write_mirror(mirror: Mirror, first: int, values: torch.Tensor) -> None:
    """values (1-D) as the parameter's elements first, first + 1, ... of `mirror`; row by row (torch path)."""
    rows = mirror.dst.view(-1, 2, mirror.block)
    done, position = 0, mirror.start + first
    while done < values.numel():
        row, col = divmod(position, mirror.block)
        take = min(mirror.block - col, values.numel() - done)
        rows[row, mirror.half, col:col + take].copy_(values[done:done + take])
        done += take
        position += take


def _seed(step: int, group: int) -> int:
    return (step * 1_000_003 + group * 7919) % (2**31 - 1)


def round_to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (so E[result] = x)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # adding to the bit pattern raises the magnitude for either sign; clearing the low 16 bits truncates it
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


if triton is not None:
    @triton.jit
    def _round_bf16(x, noise):
        """fp32 -> bf16 adding `noise` (uniform in [0, 2**16)) to the bits that rounding drops."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + noise) >> 16) << 16
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _adamw_quarter(g_ptr, p_ptr, m_ptr, v_ptr, out_ptr, scale_ptr, mirror_ptr, offs, n, noise, weight_noise,
                       decay, beta1_weight, beta2, beta2_weight, eps, step_size, inv_bc2_sqrt, mirror_start,
                       mirror_block, mirror_half, mirror_shift, HAS_OUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                       HAS_MIRROR: tl.constexpr, MIRROR_ROW_PER_PROGRAM: tl.constexpr, ROUND_STATES: tl.constexpr,
                       SPLIT: tl.constexpr, ROUND_WEIGHT: tl.constexpr):
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr)
        if SPLIT:  # the master is the bf16 weight in out_ptr and its low 16 bits in p_ptr (master_bits.py)
            hi = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
            lo = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
            p = (((hi - (lo >= 0x8000).to(tl.int32)) << 16) | lo).to(tl.float32, bitcast=True)
        elif ROUND_WEIGHT:  # the master is the bf16 weight in out_ptr itself
            p = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = p * decay
        m = m + (g - m) * beta1_weight
        v = v * beta2 + beta2_weight * g * g
        p = p - step_size * (m / (tl.sqrt(v) * inv_bc2_sqrt + eps))
        if SPLIT:
            bits = p.to(tl.int32, bitcast=True)
            lo = bits & 0xFFFF
            weight = ((bits >> 16) + (lo >= 0x8000).to(tl.int32)).to(tl.int16).to(tl.bfloat16, bitcast=True)
            tl.store(p_ptr + offs, lo.to(tl.int16), mask=mask)
        elif ROUND_WEIGHT:
            weight = _round_bf16(p, weight_noise)
        else:
            tl.store(p_ptr + offs, p, mask=mask)
            weight = p.to(out_ptr.dtype.element_ty)
        if ROUND_STATES:
            tl.store(m_ptr + offs, _round_bf16(m, noise >> 16), mask=mask)
            tl.store(v_ptr + offs, _round_bf16(v, noise & 0xFFFF), mask=mask)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offs, weight, mask=mask)
        if HAS_MIRROR:
            position = offs + mirror_start
            if MIRROR_ROW_PER_PROGRAM:
                position = position + mirror_shift
            else:
                position = position + (position // mirror_block + mirror_half) * mirror_block
            tl.store(mirror_ptr + position, weight.to(mirror_ptr.dtype.element_ty), mask=mask)

    # Triton compiles a variant per divisibility by 16 of each integer argument: the seed changes every
    # step, and each new variant would stall a step for a compile.
    @triton.jit(do_not_specialize=["seed"])
    def _adamw_kernel(g_ptr, p_ptr, m_ptr, v_ptr, out_ptr, scale_ptr, mirror_ptr, n, rng_offset, seed, decay,
                      beta1_weight, beta2, beta2_weight, eps, step_size, inv_bc2_sqrt, mirror_start, mirror_block,
                      mirror_half, HAS_OUT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MIRROR: tl.constexpr,
                      MIRROR_ROW_PER_PROGRAM: tl.constexpr, ROUND_STATES: tl.constexpr, SPLIT: tl.constexpr,
                      ROUND_WEIGHT: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        # A program's BLOCK elements are four quarters. One Philox draw (128 bits) per position in a quarter
        # gives the 16-bit noises of both moments of the four elements at that position, a quarter of the
        # integer work of a draw per element, which used 32 of its 128 bits. The draw's counter is the
        # partition position of the element in the first quarter, so the counters of a launch stay inside
        # its own range of the partition and two pieces never share bits.
        QUARTER: tl.constexpr = BLOCK // 4
        if WIDE:  # offsets past 2**31 (else 32-bit offsets: half the address arithmetic)
            start = tl.program_id(0).to(tl.int64) * BLOCK
        else:
            start = tl.program_id(0) * BLOCK
        lane = tl.arange(0, QUARTER)
        counter = start.to(tl.int64) + rng_offset + lane
        low = counter.to(tl.int32)
        if ROUND_STATES:
            r0, r1, r2, r3 = tl.philox(seed, low, (counter >> 32).to(tl.int32), low * 0, low * 0)
        else:  # no rounding, no noise
            r0, r1, r2, r3 = low, low, low, low
        if ROUND_WEIGHT:  # a second draw (third counter word 1): 16 bits of each of its words per weight
            w0, w1, w2, w3 = tl.philox(seed, low, (counter >> 32).to(tl.int32), low * 0 + 1, low * 0)
        else:
            w0, w1, w2, w3 = low, low, low, low
        # where no program's elements cross a row of the mirror, the row is found once per program: a 64-bit
        # division per element is dozens of instructions
        mirror_shift = ((start + mirror_start) // mirror_block + mirror_half) * mirror_block
        for k in tl.static_range(4):
            noise, weight_noise = r0, w0
            if k == 1:
                noise, weight_noise = r1, w1
            elif k == 2:
                noise, weight_noise = r2, w2
            elif k == 3:
                noise, weight_noise = r3, w3
            _adamw_quarter(g_ptr, p_ptr, m_ptr, v_ptr, out_ptr, scale_ptr, mirror_ptr, start + k * QUARTER + lane,
                           n, noise, weight_noise >> 16, decay, beta1_weight, beta2, beta2_weight, eps, step_size,
                           inv_bc2_sqrt, mirror_start, mirror_block, mirror_half, mirror_shift, HAS_OUT, HAS_SCALE,
                           HAS_MIRROR, MIRROR_ROW_PER_PROGRAM, ROUND_STATES, SPLIT, ROUND_WEIGHT)


def _coalesced(grads: list[torch.Tensor], mirrors: list[Mirror | None]):
    """(index of the first piece, offset, 1-D gradient pieces, mirror) over `grads` laid end to end, runs of
    small unmirrored ones together (concatenated when launched)."""
    offset, run, run_first, run_start, run_size = 0, [], 0, 0, 0
    for index, (grad, mirror) in enumerate(zip(grads, mirrors)):
        n = grad.numel()
        alone = n >= _SMALL or mirror is not None
        if run and (alone or run_size + n > _RUN):
            yield run_first, run_start, run, None
            run = []
        if alone:
            yield index, offset, [grad.reshape(-1)], mirror
        else:
            if not run:
                run_first, run_start, run_size = index, offset, 0
            run.append(grad.reshape(-1))
            run_size += n
        offset += n
    if run:
        yield run_first, run_start, run, None


@dataclass(frozen=True)
class PieceUpdate:
    """One launch of an update (MasterAdamW.plan): the gradient pieces `first` .. `first + len(grads) - 1`
    of the parameter, updated by run() on the current stream."""
    first: int
    grads: list[torch.Tensor]
    run: Callable[[], None]


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


class MasterAdamW(torch.optim.Optimizer):
    """torch's AdamW (decoupled weight decay, bias-corrected moments) for fp32 parameters whose moments
    may be bf16; `update` also takes the gradient as a list of pieces and writes a low-precision copy.

    The state keys are torch AdamW's (step, exp_avg, exp_avg_sq), which DeepSpeed's checkpoints and
    parameter-to-state mapping read."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 state_dtype: torch.dtype = torch.bfloat16):
        if state_dtype not in STATE_DTYPES.values():
            raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES.values())}, got {state_dtype}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @classmethod
    def replacing(cls, adam: torch.optim.Optimizer, state_dtype: torch.dtype) -> MasterAdamW:
        """An instance over the same parameter-group dicts (so an lr scheduler built on them still steers
        it), for an optimizer that has not stepped yet."""
        if any(adam.state.values()):
            raise RuntimeError("MasterAdamW.replacing: the optimizer has already stepped; replace it before training")
        d = adam.defaults
        new = cls([{"params": []}], lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                  state_dtype=state_dtype)
        new.param_groups = adam.param_groups
        return new

    def _state_of(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=self.state_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.state_dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                if param.grad is not None:
                    self.update(group, param, [param.grad.reshape(-1)], group_index=index)
        return loss

    @torch.no_grad()
    def update(self, group: dict, param: torch.Tensor, grads: list[torch.Tensor], *, out: torch.Tensor | None = None,
               grad_scale: torch.Tensor | None = None, group_index: int = 0,
               mirrors: list[Mirror | None] | None = None, low: torch.Tensor | None = None,
               round_out: bool = False) -> None:
        """One AdamW step of `param` (fp32, contiguous) with gradient `grads` (1-D pieces laid end to end
        from the start of param; elements past their end are left alone), dividing the gradient by
        `grad_scale` (a one-element tensor) if given, and writing the new value also to `out` if given and
        to each piece's Mirror in `mirrors` (one entry per piece, None for none). With `low` (int16, as many
        elements as param) the master weight is not param's values but bf16 `out` joined with `low`
        (master_bits.py), and is written back the same way; with `round_out` the master is bf16 `out` itself, each new
        value rounded to bf16 stochastically (unbiased: a change below half a bf16 ulp still moves the weight, as often
        as its size says). With either, param is only the key of the moments."""
        for piece in self.plan(group, param, grads, out=out, grad_scale=grad_scale, group_index=group_index,
                               mirrors=mirrors, low=low, round_out=round_out):
            piece.run()

    @torch.no_grad()
    def plan(self, group: dict, param: torch.Tensor, grads: list[torch.Tensor], *, out: torch.Tensor | None = None,
             grad_scale: torch.Tensor | None = None, group_index: int = 0,
             mirrors: list[Mirror | None] | None = None, low: torch.Tensor | None = None,
             round_out: bool = False) -> list[PieceUpdate]:
        """update's launches, not yet run: the step is counted now, and running every PieceUpdate once, in
        any order and on any streams, is that update."""
        if low is not None and (out is None or out.dtype != torch.bfloat16 or low.dtype != torch.int16
                                or low.numel() != param.numel() or out.numel() != param.numel()):
            raise ValueError("a master kept as low bits needs `out` in bf16 and `low` in int16, both of the "
                             f"parameter's {param.numel()} elements")
        if round_out and (low is not None or out is None or out.dtype != torch.bfloat16
                          or out.numel() != param.numel()):
            raise ValueError("a master kept as the rounded bf16 weight needs `out` in bf16, of the parameter's "
                             f"{param.numel()} elements, and no `low`")
        if low is None and not round_out and param.dtype != torch.float32:
            raise ValueError(f"MasterAdamW updates fp32 masters, got a {param.dtype} parameter (a bf16 weight as "
                             "its own master: round_out)")
        state = self._state_of(param)
        state["step"] += 1
        step = int(state["step"])
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        scalars = dict(decay=1.0 - lr * group["weight_decay"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       step_size=lr / (1.0 - beta1**step), inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2**step))
        seed = _seed(step, group_index)
        # the launches tell the master's kind by what is in param's place: fp32, int16 low bits or the bf16 weight
        master = low if low is not None else out if round_out else param
        flat = {name: t.view(-1) for name, t in (("p", master), ("m", state["exp_avg"]), ("v", state["exp_avg_sq"]))}
        out_flat = out.view(-1) if out is not None else None
        if sum(g.numel() for g in grads) > param.numel():
            raise ValueError(f"gradient pieces hold more than the parameter's {param.numel()} elements")
        if mirrors is not None and len(mirrors) != len(grads):
            raise ValueError(f"{len(mirrors)} mirrors for {len(grads)} gradient pieces")
        launch = self._triton_update if _use_triton(param) else self._torch_update
        pieces = []
        for first, offset, run, mirror in _coalesced(grads, mirrors or [None] * len(grads)):
            n = sum(g.numel() for g in run)
            views = [flat[k].narrow(0, offset, n) for k in ("p", "m", "v")]
            piece_out = out_flat.narrow(0, offset, n) if out_flat is not None else None
            pieces.append(PieceUpdate(first, run, partial(self._launch, launch, run, views, piece_out, mirror,
                                                          grad_scale, seed, offset, scalars)))
        return pieces

    @staticmethod
    @torch.no_grad()
    def _launch(launch, run, views, out, mirror, grad_scale, seed, offset, scalars) -> None:
        launch(torch.cat(run) if len(run) > 1 else run[0], *views, out, mirror, grad_scale, seed, offset, scalars)

    def _triton_update(self, g, p, m, v, out, mirror, grad_scale, seed, offset, s):
        n = g.numel()
        if n == 0:
            return
        split = p.dtype == torch.int16  # plan() put the master's low bits in p's place
        rounded = p.dtype == torch.bfloat16  # or the bf16 weight itself (round_out)
        row_per_program = mirror is not None and mirror.start % KERNEL_BLOCK == 0 and mirror.block % KERNEL_BLOCK == 0
        wide = max(n, mirror.dst.numel() if mirror is not None else 0) + KERNEL_BLOCK >= 2**31
        _adamw_kernel[(triton.cdiv(n, KERNEL_BLOCK),)](
            g, p, m, v, out if out is not None else p, grad_scale if grad_scale is not None else p,
            mirror.dst if mirror is not None else p, n, offset, seed, s["decay"], 1.0 - s["beta1"], s["beta2"],
            1.0 - s["beta2"], s["eps"], s["step_size"], s["inv_bc2_sqrt"], mirror.start if mirror else 0,
            mirror.block if mirror else 1, mirror.half if mirror else 0, HAS_OUT=out is not None,
            HAS_SCALE=grad_scale is not None, HAS_MIRROR=mirror is not None, MIRROR_ROW_PER_PROGRAM=row_per_program,
            ROUND_STATES=self.state_dtype == torch.bfloat16, SPLIT=split, ROUND_WEIGHT=rounded, WIDE=wide,
            BLOCK=KERNEL_BLOCK,
            num_warps=KERNEL_WARPS)

    def _torch_update(self, g, p, m, v, out, mirror, grad_scale, seed, offset, s):
        generator = torch.Generator(device=p.device)
        split = p.dtype == torch.int16  # plan() put the master's low bits in p's place
        rounded = p.dtype == torch.bfloat16  # or the bf16 weight itself (round_out)
        for start in range(0, g.numel(), _TORCH_CHUNK):
            n = min(_TORCH_CHUNK, g.numel() - start)
            gc, pc, mc, vc = (t.narrow(0, start, n) for t in (g, p, m, v))
            if split:
                low, pc = pc, join_master(out.narrow(0, start, n), pc)
            elif rounded:
                pc = pc.float()
            grad = gc.float()
            if grad_scale is not None:
                grad = grad / grad_scale
            m32 = mc.float().lerp_(grad, 1.0 - s["beta1"])
            v32 = vc.float().mul_(s["beta2"]).addcmul_(grad, grad, value=1.0 - s["beta2"])
            pc.mul_(s["decay"]).addcdiv_(m32, v32.sqrt().mul_(s["inv_bc2_sqrt"]).add_(s["eps"]), value=-s["step_size"])
            generator.manual_seed(seed * 4099 + (offset + start) // _TORCH_CHUNK)
            if self.state_dtype == torch.bfloat16:
                m32 = round_to_bf16_stochastic(m32, generator)
                v32 = round_to_bf16_stochastic(v32, generator)
            mc.copy_(m32)
            vc.copy_(v32)
            if split:
                weight, bits = split_master(pc)
                low.copy_(bits)
                out.narrow(0, start, n).copy_(weight)
            elif rounded:
                out.narrow(0, start, n).copy_(round_to_bf16_stochastic(pc, generator))
            elif out is not None:
                out.narrow(0, start, n).copy_(pc)
            if mirror is not None:
                _write_mirror(mirror, start, out.narrow(0, start, n) if split or rounded else pc)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's load puts new group dicts in place; an lr scheduler built on the optimizer this one
        # replaced (`replacing`) holds the old ones, so those are the ones updated and kept
        groups = self.param_groups
        super().load_state_dict(state_dict)
        for group, loaded in zip(groups, self.param_groups):
            group.update(loaded)
        self.param_groups = groups
        self.keep_state_dtype()  # torch casts loaded moments to the parameter's dtype (fp32)

    def keep_state_dtype(self) -> None:
        """Moments loaded in another dtype (fp32: torch's load, DeepSpeed's universal checkpoint) back in ours, and
        the step as update() keeps it."""
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)
            if "step" in state:
                state["step"] = state["step"].detach().to("cpu", torch.float32).reshape(())
