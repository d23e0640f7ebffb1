"""fp32 master weights kept as the bf16 weight plus the 16 bits it drops.

Replaces (deepspeed 0.19.8, DeepSpeedZeroOptimizer): the fp32 partitions `single_partition_of_fp32_groups` as the
one-pass step's master weights. An fp32 value is its bf16 rounding and its low 16 bits: the weight DeepSpeed keeps
anyway holds the high half, so the master needs 2 more bytes, not 4, and the step (adamw.MasterAdamW with `low`)
reads and writes 8 bytes of master a parameter instead of 4 + 4 + the 2 of the separate bf16 copy. Nothing is
rounded away: joining the two gives the fp32 master bit for bit.

The format: low = the master's low 16 bits; weight = its high 16 bits, plus one where low >= 0x8000 (rounded half
away from zero: round-to-nearest-even except that an exact tie always rounds up in magnitude, so the weight alone
says which way it went). join: high = weight - (low >= 0x8000).

While the bits lead, the fp32 partitions' memory is given back (a forward pre-hook and the step call release()).
Whatever reads or writes the fp32 masters otherwise gets them back first (settle(): allocated and joined):
DeepSpeed's state_dict (checkpoints), load_state_dict (legacy and universal loads), refresh_fp32_params,
update_lp_params and its own step (taken when a step is skipped) are wrapped to do so, and the trainer settles
before a save or an export. After a write the fp32 masters lead until the next release takes the low bits from
them, keeping the weight as it is (a weight DeepSpeed rounded to nearest-even from a tie yields a master one fp32
ulp below the tie; ours always join back exactly). Reading the fp32 partitions or their hp fragments
(deepspeed.utils.safe_get_full_fp32_param) without settle() reads released memory.

`--master-weights bf16` goes one step further (RoundedMasters): the bf16 weight alone is the master, each update
computed in fp32 and rounded stochastically (adamw.MasterAdamW with `round_out`), so nothing is kept beside it and the
step moves 14 bytes a parameter; a reader of the fp32 partitions gets the weights widened. Not exact: chosen, never
a default.

Refused with LoRA (the factors are a small share of the step; their checkpoint reads each factor's fp32 master
through DeepSpeed's hp fragments) and for fp32 weights. Guarded by tests/unit/fastpath/test_master_bits.py (the
format against fp32 for every kind of value, MasterAdamW with and without it, DeepSpeed's step, save and load).
"""
from __future__ import annotations

import torch
from torch import nn

from .applied import Applied

_CHUNK = 1 << 24  # elements per chunk of the int64 arithmetic below (a load's or a save's, not a step's)


def _to_int16(x: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2**16) as the int16 of the same 16 bits."""
    return (x - (x >= 0x8000).to(x.dtype) * 0x10000).to(torch.int16)


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 weight, int16 low bits), the format above."""
    bits = master.view(torch.int32)
    low = bits & 0xFFFF
    high = (bits >> 16) + (low >= 0x8000).to(torch.int32)
    return high.to(torch.int16).view(torch.bfloat16), _to_int16(low)


def join_master(weight: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(bf16 weight, int16 low bits) -> the fp32 master."""
    low = low.to(torch.int32) & 0xFFFF
    high = weight.view(torch.int16).to(torch.int32) - (low >= 0x8000).to(torch.int32)
    return (high * 0x10000 | low).view(torch.float32)


def low_bits_keeping(master: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The low bits that join with `weight` as it is into the master, or into the joinable value nearest it where
    the weight is not split_master's rounding of the master (a tie DeepSpeed rounded down to even: one fp32 ulp)."""
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    high = weight.view(torch.int16).to(torch.int64) & 0xFFFF
    base = high << 16
    # joinable with this weight: high's own 32768 patterns and the upper half of the ones below (low >= 0x8000),
    # never crossing the sign bit (-0's joins stay negative)
    lowest = torch.maximum(base - 0x8000, (high & 0x8000) << 16)
    bits = torch.minimum(torch.maximum(bits, lowest), base + 0x7FFF)
    return _to_int16(bits & 0xFFFF)


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield start, min(_CHUNK, n - start)


class MasterBits:
    """The low bits of each of a ZeRO optimizer's fp32 partitions, and whether those partitions are allocated
    (`live`) and whether they hold what the low bits do not yet (`_masters_lead`)."""

    name, replaces = "master_low_bits", "DeepSpeedZeroOptimizer.single_partition_of_fp32_groups as master weights"

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.masters = optimizer.single_partition_of_fp32_groups
        self.low = self._new_low_bits()
        self.live = True
        self._masters_lead = True

    def _new_low_bits(self) -> list[torch.Tensor] | None:
        return [torch.empty(m.numel(), dtype=torch.int16, device=m.device) for m in self.masters]

    def step_kwargs(self, i: int) -> dict:
        """What MasterAdamW.plan takes to update group i's masters in this form."""
        return {"low": self.low[i]}

    def weight(self, i: int) -> torch.Tensor:
        """This rank's bf16 partition of group i: the high half of its masters."""
        from deepspeed import comm as dist  # here: the format above (adamw.py's too) needs torch alone

        partition_id = dist.get_rank(group=self.optimizer.real_dp_process_group[i])
        return self.optimizer.parallel_partitioned_bit16_groups[i][partition_id].view(-1)

    @torch.no_grad()
    def release(self) -> None:
        """The low bits current and the fp32 partitions' memory given back (before a forward, and the step)."""
        if self._masters_lead:
            self._take_from_masters()
            self._masters_lead = False
        if self.live:
            for master in self.masters:
                master.untyped_storage().resize_(0)
            self.live = False

    @torch.no_grad()
    def settle(self) -> None:
        """The fp32 partitions allocated again and equal to the weights joined with their low bits, for a reader."""
        if self.live:
            return
        for i, master in enumerate(self.masters):
            master.untyped_storage().resize_(master.numel() * master.element_size())
            self._write_master(i, master.view(-1))
        self.live = True

    def _take_from_masters(self) -> None:
        for i, (master, low) in enumerate(zip(self.masters, self.low)):
            weight = self.weight(i)
            for start, n in _chunks(master.numel()):
                low.narrow(0, start, n).copy_(low_bits_keeping(master.view(-1).narrow(0, start, n),
                                                               weight.narrow(0, start, n)))

    def _write_master(self, i: int, flat: torch.Tensor) -> None:
        weight, low = self.weight(i), self.low[i]
        for start, n in _chunks(flat.numel()):
            flat.narrow(0, start, n).copy_(join_master(weight.narrow(0, start, n), low.narrow(0, start, n)))

    def written(self) -> None:
        """Something wrote the (settled) fp32 partitions: the next release takes the low bits from them."""
        assert self.live, "the fp32 masters were written while released"
        self._masters_lead = True


class RoundedMasters(MasterBits):
    """The bf16 weights are the masters (--master-weights bf16): nothing is kept beside them."""

    name, replaces = "bf16_master_weights", "DeepSpeedZeroOptimizer.single_partition_of_fp32_groups as master weights"

    def _new_low_bits(self) -> None:
        return None

    def step_kwargs(self, i: int) -> dict:
        return {"round_out": True}

    def _take_from_masters(self) -> None:
        pass  # whatever wrote the fp32 masters wrote the weights as their rounding too, and those are the masters now

    def _write_master(self, i: int, flat: torch.Tensor) -> None:
        flat.copy_(self.weight(i))


def settled(state, method, writes: bool):
    """`method` of the ZeRO optimizer run on a settled ZeroState (ZeroState.settle: the fp32 masters written out);
    where it writes the masters, the next release takes the low bits from them."""
    def run(*args, **kwargs):
        state.settle()
        result = method(*args, **kwargs)
        if writes and state.master_bits is not None:
            state.master_bits.written()
        return result
    return run


def _own_storage(master: torch.Tensor) -> bool:
    return (master.storage_offset() == 0 and master.is_contiguous()
            and master.untyped_storage().nbytes() == master.numel() * master.element_size())


def keep_masters_in_weights(state, model: nn.Module, kind: type[MasterBits] = MasterBits
                             ) -> tuple[Applied, object | None]:
    """Have the one-pass step (fuse_adam_step, installed first) keep the masters as low bits (state.master_bits),
    or as the bf16 weights alone (kind RoundedMasters), and wrap DeepSpeed's readers and writers of the fp32
    partitions; returns the Applied and the forward pre-hook's handle (None where refused)."""
    from .step_overlap import mostly_frozen

    name, replaces = kind.name, kind.replaces
    optimizer = state.optimizer
    refused = ("needs one_pass_adamw" if not state.fused_step
               else f"{optimizer.dtype} weights" if optimizer.dtype != torch.bfloat16
               else "most weights are frozen (LoRA): the factors are a small share of the step" if mostly_frozen(model)
               else "an fp32 partition shares its storage"
               if not all(_own_storage(m) for m in optimizer.single_partition_of_fp32_groups) else "")
    if refused:
        return Applied(name, replaces, refused), None
    bits = state.master_bits = kind(optimizer)
    for method, writes in (("state_dict", False), ("load_state_dict", True), ("refresh_fp32_params", True),
                           ("update_lp_params", True)):
        setattr(optimizer, method, settled(state, getattr(optimizer, method), writes))
    bits.release()
    return Applied(name, replaces), model.register_forward_pre_hook(lambda module, args: bits.release())
