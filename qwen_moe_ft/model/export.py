"""Export the trained model in the stock transformers Qwen3-MoE layout (hub_layout.py), streamed: one weight
at a time is gathered from the EP ranks onto rank 0, which alone copies it to its CPU and writes it into the
shard being filled (shard_writer.py). Extra GPU memory: one gathered expert weight of one layer, on rank 0;
extra host memory: one shard, on rank 0.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..parallel.expert_parallel import gather_experts_to, in_ep_group_of
from .hub_layout import EXPERT, dense_key, expert_key
from .loading import causal_lm_of
from .shard_writer import ShardWriter

WRITER = 0  # the global rank that writes


def hf_layout(lm: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every key of the export with a meta tensor of its shape and dtype, in the order they are written."""
    modules = dict(lm.named_modules())
    layout = {}
    for name, param in lm.named_parameters():
        if match := EXPERT.match(name):
            for e in range(modules[match["layer"]].num_experts):
                layout[expert_key(match["layer"], match["w"], e)] = torch.empty(param.shape[1:], dtype=dtype,
                                                                                device="meta")
        else:
            layout[dense_key(name)] = torch.empty(param.shape, dtype=dtype, device="meta")
    return layout


def _stream(lm: torch.nn.Module, writer: ShardWriter | None, dtype: torch.dtype) -> None:
    """Each weight to the writer, experts gathered; every rank walks the same parameters (collectives)."""
    modules = dict(lm.named_modules())
    for name, param in lm.named_parameters():
        if match := EXPERT.match(name):
            layer = modules[match["layer"]]
            if not in_ep_group_of(layer, WRITER):
                continue  # other EP groups hold the same experts
            full = gather_experts_to(param, layer, WRITER)
            if writer is not None:
                full = full.to(device="cpu", dtype=dtype)
                for e in range(full.shape[0]):
                    writer.add(expert_key(match["layer"], match["w"], e), full[e].clone())
            del full
        elif writer is not None:
            # clone: ZeRO keeps parameters as views of flat buffers, which safetensors refuses to save
            writer.add(dense_key(name), param.detach().to(device="cpu", dtype=dtype).clone())


def save_hf_checkpoint(model: torch.nn.Module, tokenizer, out_dir: str | Path, *, is_main: bool,
                       dtype: torch.dtype = torch.bfloat16, max_shard_size: str | int = "5GB") -> Path:
    """config, tokenizer and sharded safetensors that `AutoModelForCausalLM.from_pretrained` loads. A
    collective: every rank calls it; `is_main` must be true on global rank 0 only."""
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")  # renamed into place once complete
    lm = causal_lm_of(model)
    writer = None
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        config = copy.deepcopy(lm.config)
        config.dtype = dtype
        config.save_pretrained(partial)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        writer = ShardWriter(partial, hf_layout(lm, dtype), max_shard_size)
    with torch.no_grad():
        _stream(lm, writer, dtype)
    if is_main:
        writer.close()
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    if dist.is_initialized():
        dist.barrier()
    return out
