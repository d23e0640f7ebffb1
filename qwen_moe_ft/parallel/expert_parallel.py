"""Expert parallelism through DeepSpeed AutoEP: the EP size, the layer replacement, gathering experts.

AutoEP replaces every Qwen3-MoE block with one that holds this rank's contiguous block of
`num_experts / ep_size` experts (`experts.w1` gate and `experts.w3` up, [E_local, I, H]; `experts.w2`
down, [E_local, H, I]) and exchanges tokens with an all-to-all. Ranks of one EP group are consecutive.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.module_inject.auto_ep import AutoEP
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from deepspeed.module_inject.auto_ep_config import parse_autoep_config
from torch import nn


def apply_autoep(model: nn.Module, ds_config: dict, rank: int) -> None:
    """AutoEP's layer replacement, done before DeepSpeed sees the model; the engine is then configured with
    expert_parallel disabled and builds the EP groups for the replaced layers itself. A model that already
    holds AutoEP layers of this EP size (model/rank_local.py loads it so) is left as it is."""
    ep_section = ds_config["expert_parallel"]
    ep_size = ep_section["autoep_size"]
    done = {m.ep_size for m in model.modules() if isinstance(m, AutoEPMoELayer)}
    if done:
        if done != {ep_size}:
            raise ValueError(f"the model holds AutoEP layers of EP size {sorted(done)}, not {ep_size}")
        return
    autoep = AutoEP(model, parse_autoep_config(ep_section))
    autoep.replace_moe_layers(autoep.ep_parser(), ep_size=ep_size, ep_rank=rank % ep_size)


def gather_experts_to(local: torch.Tensor, layer, dst: int) -> torch.Tensor | None:
    """[E_local, ...] of this rank -> [E, ...] in expert order (ranks hold contiguous blocks) on global rank `dst`
    only (None on the other ranks of its EP group); a collective over the layer's EP group, which only the ranks of
    `dst`'s group may call."""
    if layer.ep_size == 1:
        return local.detach()
    is_dst = dist.get_rank() == dst
    parts = [torch.empty_like(local) for _ in range(layer.ep_size)] if is_dst else None
    dist.gather(local.detach().contiguous(), parts, dst=dst, group=layer.ep_group)
    return torch.cat(parts, dim=0) if is_dst else None


def in_ep_group_of(layer, rank: int) -> bool:
    """Whether `rank` shares this rank's EP group in `layer` (every rank does at EP size 1 with itself only)."""
    if layer.ep_size == 1:
        return dist.get_rank() == rank if dist.is_initialized() else rank == 0
    return rank in dist.get_process_group_ranks(layer.ep_group)
