"""LoRA under DeepSpeed AutoEP, exported as a PEFT adapter of the stock transformers Qwen3-MoE model.

DeepSpeed would run AutoEP inside `deepspeed.initialize`, after the optimizer's parameters are
fixed. So the order here is: AutoEP's own layer replacement first (this rank keeps its block of
experts), then LoRA on this rank's experts (our module, with PEFT's `target_parameters` semantics
for `experts.gate_up_proj` and `experts.down_proj`) and on the attention projections (our module
too, with PEFT's names and arithmetic, a fraction of its wrappers' host time). The engine recognises
the replaced layers, builds the expert-parallel groups itself, and optimises the expert LoRA factors
over the expert-data-parallel group like any expert weight. The adapter is written in PEFT's format.
"""
from __future__ import annotations

# peft is imported to write the adapter's config only: training never loads it (a second of start-up a process)

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..config import LoraConfig
from ..parallel.expert_parallel import apply_autoep, gather_experts_to, in_ep_group_of
from .export import WRITER
from .lora_expert_mlp import ExpertLoRAMlp

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
PEFT_PREFIX = "base_model.model."  # PEFT's names of the stock model's parameters in an adapter file
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_config(lora: LoraConfig, base_model: str):
    """The adapter's config as PEFT writes it for the stock model (also what adapter_config.json holds)."""
    import peft

    targets = lora.target_list()
    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, bias="none",
                      target_modules=ATTENTION_MODULES if "attn" in targets else [],
                      target_parameters=EXPERT_PARAMETERS if "experts" in targets else None,
                      base_model_name_or_path=base_model, task_type="CAUSAL_LM")


class LinearLoRA(nn.Module):
    """PEFT's LoRA of one nn.Linear, base(x) + (alpha / r) B(A(x)), under PEFT's names (`base_layer`, `lora_A.weight`,
    `lora_B.weight`). One GEMM for the base, one through rank r, and B's product added to the base's output by the
    GEMM itself (addmm): PEFT's wrapper launches a scaling and an addition more, behind ~100 us of Python a call
    that a host-bound LoRA step pays for each of a layer's four projections, forward and recompute."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base
        self.scaling = alpha / rank
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **like)  # kaiming uniform, as PEFT's
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **like)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        low = F.linear(x, self.lora_A.weight)
        out = torch.addmm(base.reshape(-1, base.shape[-1]), low.reshape(-1, low.shape[-1]), self.lora_B.weight.t(),
                          alpha=self.scaling)
        return out.view(base.shape)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        self.base_layer.weight.add_(delta.to(self.base_layer.weight.dtype))
        return self.base_layer


class ExpertLoRA(nn.Module):
    """LoRA of this rank's experts: W_e + (alpha / r) B_e A_e for gate_up ([2I, H]) and down ([H, I]).

    The forward never builds W_e + (alpha / r) B_e A_e: the frozen base runs its grouped GEMMs and the
    update is added as (alpha / r) (x A_e^T) B_e^T, so autograd keeps rank-r and activation-sized tensors
    only. A is initialised per global expert index from its own seed, so a run gives the same adapter at
    any EP size; B starts at zero, so training starts from the base model.
    """

    def __init__(self, experts: nn.Module, *, first_expert: int, layer: int, rank: int, alpha: float, seed: int):
        super().__init__()
        self.base = experts
        local, inter, hidden = experts.w1.shape
        self.inter = inter
        self.scaling = alpha / rank
        self.lora_A_gate_up = nn.Parameter(self._init_a(local, rank, hidden, first_expert, layer, seed, 0))
        self.lora_B_gate_up = nn.Parameter(torch.zeros(local, 2 * inter, rank, dtype=experts.w1.dtype))
        self.lora_A_down = nn.Parameter(self._init_a(local, rank, inter, first_expert, layer, seed, 1))
        self.lora_B_down = nn.Parameter(torch.zeros(local, hidden, rank, dtype=experts.w1.dtype))
        for param in self.lora_parameters():
            # What AutoEP marks on expert weights: reduce over the expert-data-parallel group only.
            for attr in ("allreduce", "group_name", "ds_zero_placement_family", "ds_zero_partition_group_name"):
                setattr(param, attr, getattr(experts.w1, attr))

    @staticmethod
    def _init_a(local, rank, fan_in, first_expert, layer, seed, which):
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default (kaiming uniform, a=sqrt(5)), as PEFT's lora_A
        rows = []
        for e in range(first_expert, first_expert + local):
            g = torch.Generator().manual_seed(hash((seed, layer, e, which)) % 2**63)
            rows.append(torch.empty(rank, fan_in).uniform_(-bound, bound, generator=g))
        return torch.stack(rows)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A_gate_up, self.lora_B_gate_up, self.lora_A_down, self.lora_B_down]

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate_up = self.scaling * torch.bmm(self.lora_B_gate_up, self.lora_A_gate_up)
        down = self.scaling * torch.bmm(self.lora_B_down, self.lora_A_down)
        return gate_up[:, :self.inter], gate_up[:, self.inter:], down  # gate (w1), up (w3), down (w2)

    # one_rank_dispatch (fastpath/local_dispatch.py) passes the tokens and the routed rows' order instead of gathered
    # rows to experts that take them
    takes_token_rows = True

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, rows: torch.Tensor | None = None,
                top_k: int = 1) -> torch.Tensor:
        """x: the routed rows in expert order; or, with `rows`, the tokens (row i is token rows[i] // top_k)."""
        offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        out = ExpertLoRAMlp.apply(x, rows, top_k, offsets, self.base, self.scaling, *self.lora_parameters())
        return out.type_as(x)


def apply_lora(model: nn.Module, lora: LoraConfig, ds_config: dict, rank: int, seed: int) -> nn.Module:
    """AutoEP layout, then LoRA on local experts and attention; every base weight frozen. `seed` draws A."""
    apply_autoep(model, ds_config, rank)
    for param in model.parameters():
        param.requires_grad_(False)
    if "experts" in lora.target_list():
        for index, layer in enumerate(model.model.layers):
            moe = layer.mlp
            moe.experts = ExpertLoRA(moe.experts, first_expert=moe.ep_rank * moe.num_local_experts, layer=index,
                                     rank=lora.rank, alpha=lora.alpha, seed=seed)
    if "attn" in lora.target_list():
        torch.manual_seed(seed)  # same attention LoRA init at every EP size
        for layer in model.model.layers:
            for name in ATTENTION_MODULES:
                setattr(layer.self_attn, name, LinearLoRA(getattr(layer.self_attn, name), lora.rank, lora.alpha))
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight; returns the plain causal LM (ends training)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, ExpertLoRA):
                for weight, delta in zip(("w1", "w3", "w2"), child.deltas()):
                    getattr(child.base, weight).add_(delta.to(getattr(child.base, weight).dtype))
                setattr(module, name, child.base)
            elif isinstance(child, LinearLoRA):
                setattr(module, name, child.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """LoRA weights under PEFT's names for the stock model, on the CPU of global rank WRITER; None on the others.
    A collective: expert factors are gathered to WRITER over its EP groups one layer at a time, so no other rank
    holds the adapter (its full size is ~1.3 GB at Qwen3-30B-A3B's width)."""
    is_writer = (dist.get_rank() if dist.is_initialized() else 0) == WRITER
    out = {}
    if is_writer:
        for name, module in model.named_modules():
            if isinstance(module, LinearLoRA):
                for factor in ("lora_A", "lora_B"):
                    weight = getattr(module, factor).weight
                    out[f"{PEFT_PREFIX}{name}.{factor}.weight"] = weight.detach().to("cpu", copy=True)
    for name, module in model.named_modules():
        if not isinstance(module, ExpertLoRA):
            continue
        layer = name[:-len(".experts")]
        moe = model.get_submodule(layer)
        if not in_ep_group_of(moe, WRITER):
            continue  # other EP groups hold the same experts
        factors = [gather_experts_to(p, moe, WRITER) for p in module.lora_parameters()]
        if not is_writer:
            continue
        a_gu, b_gu, a_d, b_d = (f.to("cpu", copy=True) for f in factors)
        experts, rank = a_gu.shape[0], a_gu.shape[1]
        prefix = f"{PEFT_PREFIX}{layer}.experts"
        # PEFT's ParamWrapper: lora_A rows are expert-major (e, r); lora_B columns rank-major (r, e).
        out[f"{prefix}.base_layer.lora_A.weight"] = a_gu.reshape(experts * rank, -1)
        out[f"{prefix}.base_layer.lora_B.weight"] = b_gu.permute(1, 2, 0).reshape(b_gu.shape[1], rank * experts)
        out[f"{prefix}.lora_A.weight"] = a_d.reshape(experts * rank, -1)
        out[f"{prefix}.lora_B.weight"] = b_d.permute(1, 2, 0).reshape(b_d.shape[1], rank * experts)
    return out if is_writer else None


def save_adapter(model: nn.Module, lora: LoraConfig, base_model: str, out_dir: str | Path, *, is_main: bool) -> Path:
    """adapter_config.json + adapter_model.safetensors that PeftModel.from_pretrained loads on the stock model. A
    collective: every rank calls it; `is_main` must be true on global rank 0 (WRITER) only."""
    out = Path(out_dir)
    state = adapter_state_dict(model)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        peft_config(lora, base_model).save_pretrained(out)
        save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    if dist.is_initialized():
        dist.barrier()
    return out
