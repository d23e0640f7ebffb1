"""A plain training loop written with transformers and torch alone: the reference the trainer is checked against
(tests/integration/test_reference.py). Nothing of qwen_moe_ft is imported.

Stock Qwen3MoeForCausalLM in float32 with transformers' eager experts and eager attention; every document runs on
its own (no packing, no padding); the step's loss is the cross-entropy summed over the label tokens of the whole
global batch divided by their number, plus coef x transformers' load_balancing_loss_func over the router logits of
all the step's tokens; torch.nn.utils.clip_grad_norm_, torch.optim.AdamW (fp32 moments) and torch's
CosineAnnealingLR (a cosine from lr to min_lr_ratio x lr over the run, no warmup). With `lora`, PEFT's LoRA on the
stock model (attention projections as modules, the experts' fused weights as target_parameters)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

IGNORE = -100


@dataclass
class StepRecord:
    loss: float  # cross-entropy per label token, router term left out (what the trainer logs as loss)
    aux_loss: float  # coef x transformers' load-balancing loss
    grad_norm: float  # before clipping
    grads: dict[str, torch.Tensor] = field(repr=False)  # trainable parameters' gradients, before clipping
    expert_load: list[list[int]]  # [layer][expert]: the step's tokens that chose the expert among their top-k


class ReferenceLoop:
    def __init__(self, model_dir, *, lr: float, steps: int, min_lr_ratio: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, grad_clip: float, aux_coef: float, lora: dict | None = None):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager",
                                                     attn_implementation="eager")
        if lora is not None:
            from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

            config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
            model = get_peft_model(model, config)
            result = set_peft_model_state_dict(model, lora["initial"])
            assert not result.unexpected_keys, result.unexpected_keys
        self.model = model.train()
        # LoRA factors under the adapter file's names (PEFT's state dict drops the adapter's name, "default")
        self.params = {name.replace(".default.", "."): p for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps,
                                                                    eta_min=lr * min_lr_ratio)
        self.grad_clip, self.aux_coef = grad_clip, aux_coef
        config = model.config
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok

    def step(self, documents: list[dict]) -> StepRecord:
        """One optimizer step over the global batch's documents ({"input_ids", "shift_labels"} each)."""
        ce_sum, label_tokens = torch.zeros(()), 0
        router_logits = None
        for doc in documents:
            out = self.model(input_ids=doc["input_ids"][None], output_router_logits=True, use_cache=False)
            ce_sum = ce_sum + F.cross_entropy(out.logits[0], doc["shift_labels"], ignore_index=IGNORE,
                                              reduction="sum")
            label_tokens += int((doc["shift_labels"] != IGNORE).sum())
            logits = [x.reshape(-1, self.num_experts) for x in out.router_logits]
            router_logits = [[x] for x in logits] if router_logits is None else [
                seen + [x] for seen, x in zip(router_logits, logits)]
        loss = ce_sum / label_tokens
        layer_logits = [torch.cat(x) for x in router_logits]
        aux = self.aux_coef * load_balancing_loss_func(tuple(layer_logits), self.num_experts, self.top_k)
        expert_load = [torch.bincount(x.detach().topk(self.top_k, dim=-1).indices.flatten(),
                                      minlength=self.num_experts).tolist() for x in layer_logits]
        self.optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        grads = {name: p.grad.detach().clone() for name, p in self.params.items()}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params.values(), self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        return StepRecord(loss.item(), aux.item(), grad_norm.item(), grads, expert_load)
