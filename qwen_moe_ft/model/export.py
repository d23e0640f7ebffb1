"""Export the trained model in the stock transformers Qwen3-MoE layout, experts gathered from every EP rank.

AutoEP keeps, per MoE layer, this rank's contiguous block of experts as `experts.w1` (gate),
`experts.w3` (up), both [E_local, I, H], and `experts.w2` (down) [E_local, H, I], and the router as
`router.gate`. Qwen3-MoE checkpoints on the hub (what transformers' save_pretrained writes, and
vLLM and SGLang read) hold one `mlp.experts.{e}.{gate,up,down}_proj.weight` per expert, and
`mlp.gate.weight`.
"""
from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import save_torch_state_dict

from ..parallel.expert_parallel import gather_experts
from .loading import causal_lm_of

_EXPERT = re.compile(r"^(?P<layer>.*\.mlp)\.experts\.(?P<w>w[123])$")
_ROUTER = re.compile(r"^(?P<layer>.*\.mlp)\.router\.gate\.weight$")


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full weights under transformers' names, on the CPU. A collective: every rank must call it."""
    lm = causal_lm_of(model)
    modules = dict(lm.named_modules())
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in lm.named_parameters():
        if match := _EXPERT.match(name):
            layer = modules[match["layer"]]
            experts.setdefault(match["layer"], {})[match["w"]] = gather_experts(param, layer)
            continue
        if match := _ROUTER.match(name):
            name = f"{match['layer']}.gate.weight"
        out[name] = param.detach()
    for layer, w in experts.items():
        for e in range(w["w1"].shape[0]):
            for proj, key in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                out[f"{layer}.experts.{e}.{proj}.weight"] = w[key][e]
    # clone: ZeRO keeps parameters as views of flat buffers, which safetensors refuses to save
    return {k: v.to(device="cpu", dtype=dtype or v.dtype).clone() for k, v in out.items()}


def save_hf_checkpoint(model: torch.nn.Module, tokenizer, out_dir: str | Path, *, is_main: bool,
                       dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "5GB") -> Path:
    """config, tokenizer and sharded safetensors that `AutoModelForCausalLM.from_pretrained` loads."""
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")  # renamed into place once complete
    state = hf_state_dict(model, dtype)
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        lm = causal_lm_of(model)
        config = copy.deepcopy(lm.config)
        config.dtype = dtype
        config.save_pretrained(partial)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        save_torch_state_dict(state, partial, max_shard_size=max_shard_size)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    if dist.is_initialized():
        dist.barrier()
    return out
