"""What the ZeRO-step patches share about one DeepSpeed ZeRO-1/2 optimizer.

Held by the FastPath and handed to each patch; nothing is stored on DeepSpeed's objects except the
replaced methods themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from deepspeed import comm as dist

from .gate_up_cache import GateUpCaches


@dataclass
class ZeroState:
    optimizer: object  # deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer
    one_pass_norm: bool = False  # grad_norm.lean_grad_checks installed
    fused_step: bool = False  # zero_step.fuse_adam_step installed
    overlap: object | None = None  # step_overlap.StepOverlap, where the step runs beside the next forward
    master_bits: object | None = None  # master_bits.MasterBits, where the masters are kept as low bits
    # id(param) -> its gradient's norm, taken in the backward (grad_norm.norm_in_backward); the step's norm
    # consumes them
    early_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_up: GateUpCaches = field(default_factory=GateUpCaches)
    _group_sizes: dict[int, int] = field(default_factory=dict)
    _device_indices: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)

    def settle(self) -> None:
        """Weights and optimizer state as a reader other than the forward needs them: the updates still running beside
        the forward waited for (step_overlap), the fp32 masters kept as low bits written out (master_bits)."""
        if self.overlap is not None:
            self.overlap.settle()
        if self.master_bits is not None:
            self.master_bits.settle()

    def group_dp_size(self, i: int) -> int:
        """World size of parameter group i's data-parallel group, looked up once (it is on every step's path)."""
        if i not in self._group_sizes:
            self._group_sizes[i] = dist.get_world_size(group=self.optimizer.real_dp_process_group[i])
        return self._group_sizes[i]

    def device_index(self, key: str, values: list[int]) -> torch.Tensor:
        """`values` as a device tensor, built once: a host-to-device copy waits for the GPU to catch up."""
        if key not in self._device_indices or self._device_indices[key][0] != values:
            device = torch.device(self.optimizer.device)
            self._device_indices[key] = (values, torch.tensor(values, dtype=torch.long, device=device))
        return self._device_indices[key][1]
