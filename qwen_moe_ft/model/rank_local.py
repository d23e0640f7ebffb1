"""Rank-local loading: this rank's model in AutoEP's layout, filled from the checkpoint's shards with the dense
weights and only its own block of experts, so host memory holds (dense + own experts), never the whole model.

The model is built without storage (parameters on the meta device), AutoEP replaces its MoE blocks (still
without storage), every needed tensor is checked in the shards (present, readable, right shape) before
anything is allocated, and then each parameter gets its values read straight into AutoEP's layout.
"""
from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from ..parallel.expert_parallel import apply_autoep
from .hub_layout import EXPERT, dense_key, expert_key, fused_key
from .shards import ModelLoadError, Shards

# What a tensor of this rank is made of: (checkpoint key, slices of it, index into the parameter)
Reads = list[tuple[str, tuple[slice, ...], tuple]]

# AutoEP's buffers that start at zero (token counts per expert, load-balancing bias)
ZERO_BUFFERS = ("tokens_per_expert", "expert_bias")


def _expert_reads(shards: Shards, name: str, param: nn.Parameter, layer: nn.Module) -> Reads:
    """Per-expert keys if the checkpoint has them, else the fused tensors, for this rank's block of experts."""
    match = EXPERT.match(name)
    first = layer.ep_rank * layer.num_local_experts
    experts = range(first, first + layer.num_local_experts)
    if expert_key(match["layer"], match["w"], first) in shards:
        reads = [(expert_key(match["layer"], match["w"], e), (), (i,)) for i, e in enumerate(experts)]
        for key, _, _ in reads:
            shards.check(key, tuple(param.shape[1:]))
        return reads
    inter = param.shape[1] if match["w"] != "w2" else param.shape[2]
    key, rows = fused_key(match["layer"], match["w"], inter)
    if key not in shards:
        raise ModelLoadError(f"neither {expert_key(match['layer'], match['w'], first)} nor {key} is in the "
                             f"checkpoint ({shards.directory})")
    full = (layer.num_experts, 2 * inter, param.shape[2]) if match["w"] != "w2" else (layer.num_experts,
                                                                                      *param.shape[1:])
    shards.check(key, full)
    return [(key, (slice(experts.start, experts.stop), rows), ())]


def _plan(model: nn.Module, shards: Shards) -> dict[str, Reads]:
    """Every parameter's reads, each checked in the shards; raises before any weight is allocated."""
    modules = dict(model.named_modules())
    plan = {}
    for name, param in model.named_parameters():
        if match := EXPERT.match(name):
            plan[name] = _expert_reads(shards, name, param, modules[match["layer"]])
        else:
            shards.check(dense_key(name), tuple(param.shape))
            plan[name] = [(dense_key(name), (), ())]
    return plan


def _materialise(model: nn.Module, plan: dict[str, Reads], shards: Shards) -> None:
    params = dict(model.named_parameters())
    filled: dict[int, nn.Parameter] = {}  # by the meta parameter's id: tied and aliased weights stay one
    for name, reads in plan.items():
        old = params[name]
        values = torch.empty(old.shape, dtype=old.dtype)
        for key, index, into in reads:
            values[into].copy_(shards.read(key, index))
        new = nn.Parameter(values, requires_grad=old.requires_grad)
        new.__dict__.update(old.__dict__)  # AutoEP's marks on expert and router weights
        filled[id(old)] = new
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, filled[id(param)])
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            if name.rpartition(".")[2] not in ZERO_BUFFERS:
                raise ModelLoadError(f"buffer {name} has no values (not in the checkpoint, not one of AutoEP's "
                                     f"zero-initialised {ZERO_BUFFERS})")
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def load_rank_local(directory, config, dtype: torch.dtype, attn_implementation: str, ds_config: dict,
                    rank: int) -> nn.Module:
    """The model in AutoEP's layout with this rank's weights, on the CPU, in eval mode (as from_pretrained)."""
    shards = Shards(directory)
    try:
        with init_empty_weights(include_buffers=False):  # buffers (RoPE frequencies) computed as usual
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
            apply_autoep(model, ds_config, rank)
        _materialise(model, _plan(model, shards), shards)
    finally:
        shards.close()
    return model.eval()
