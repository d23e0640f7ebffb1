"""The MoE router's training terms and load counts: load-balancing loss, router z-loss, expert load, freezing.

Forward hooks on every AutoEP block's router (`layer.router`, DeepSpeed's TokenChoiceTopKRouter) and on its
gate (`layer.router.gate`, the nn.Linear that gives the logits) see each layer's logits and chosen experts
whichever forward runs the block: AutoEP's `_forward` at any EP size and the fast path's `_one_rank_forward`
both call `layer.router(x, layer.expert_bias)`. Per micro-batch and layer they keep the logits and c below;
after the forward, loss() computes s and z from the logits (outside any activation-checkpointed layer, whose
recompute runs no hook). All over real tokens only (padding of unpacked batches and filler batches are masked
out), on the device, read by the host only with the step's metrics:
    c_i  token-slots that chose expert i (no gradient)
    s_i  sum over tokens of the router probability softmax(logits)_i
    z    sum over tokens of logsumexp(logits)^2

Load-balancing loss, the Switch Transformer's (eq. 4-6) on transformers' scale (`--router-aux-loss-form
transformers`, the default): transformers 5.17's `load_balancing_loss_func`, for which Qwen3's
router_aux_loss_coef was chosen, pools the token-slots and probabilities of all L layers before the product:
    aux = coef * E * sum_i C_i / R * S_i / R,   C_i = sum_l c_{l,i},   S_i = sum_l s_{l,i},   R = L N
with N real tokens; C counts every one of a token's K choices, so even routing gives coef * K (0.008 for
Qwen3-30B-A3B's coefficient 0.001 and top-8). `per_layer`: the loss of each layer with f the fraction of
token-slots, averaged over layers, as Megatron-LM's switch_load_balancing_loss_func normalises it:
    aux = coef * E / L * sum_l sum_i f_{l,i} P_{l,i},   f_{l,i} = c_{l,i} / (N K),   P_{l,i} = s_{l,i} / N
which is coef at even routing, 1/K of transformers' at the same coefficient.

Scope `global` (what Qwen3 was trained with): c and N are those of the whole step, every micro-batch of
every rank. As c carries no gradient, aux is linear in the micro-batches' s: aux = sum over micro-batches m
of A_m, the formula with the step's c and N and micro-batch m's s, and each micro-batch's backward takes its
own A_m exactly, provided the step's c is known before the first backward. With one micro-batch a step (the
recipes) the forward's own counts, summed over ranks by one all-reduce of the [L, E] counts before the
backward, are the step's. With accumulation the later micro-batches' counts do not exist when the first
backward runs, and without keeping every micro-batch's graph (the memory of one G-times larger batch) no
exact gradient can wait for them: a counting pass runs the model body without gradient over the step's
micro-batches first (no lm_head, about a third of the step's compute; said at startup), and its
all-reduced counts are the step's. The training forwards route the same tokens with the same weights: the
same counts.

Scope `micro_batch`: each micro-batch's loss from its own counts, tokens and s on its own rank, averaged over
the step's micro-batches that hold tokens.

Router z-loss (ST-MoE): z_coef * the mean over the step's real tokens and over layers of logsumexp^2.

Expert load: the training forwards' counts, summed over micro-batches and ranks with the step's metrics.
Not AutoEP's `tokens_per_expert` buffer: it also counts padding and filler tokens, and as a float32 running
sum it stops counting exactly past 2^24 token-slots per expert.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from deepspeed.moe.ep_router import TokenChoiceTopKRouter
from torch import nn
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from .data.packing import MicroBatch
from .model.loading import causal_lm_of

SCOPES = ("global", "micro_batch")
FORMS = ("transformers", "per_layer")


def freeze_router(model: nn.Module) -> int:
    """requires_grad False on every MoE router's gate, in transformers' blocks or AutoEP's (which copies the flag
    from the gate it replaces): no gradient, no optimizer state. Returns the number of routers frozen."""
    routers = [m for m in model.modules() if isinstance(m, (Qwen3MoeTopKRouter, Qwen2MoeTopKRouter,
                                                              TokenChoiceTopKRouter))]
    for router in routers:
        router.requires_grad_(False)
    return len(routers)


def real_token_mask(micro: MicroBatch) -> torch.Tensor | None:
    """1.0 for each real token of the flattened micro-batch, 0.0 for padding; None when every token is real."""
    ids = micro.inputs["input_ids"]
    if micro.num_tokens == 0:  # a filler batch
        return torch.zeros(ids.numel(), device=ids.device)
    mask = micro.inputs.get("attention_mask")
    if mask is not None:
        return mask.reshape(-1).float()
    if micro.num_tokens < ids.numel():  # a sequence shard reaching into its row's padding, which follows the tokens
        return (torch.arange(ids.numel(), device=ids.device) < micro.num_tokens).float()
    return None


@dataclass
class RouterStats:
    """One step's router figures, summed over ranks."""
    aux_loss: float
    z_loss: float
    load: list[list[float]]  # [layer][expert]: token-slots routed this step

    @property
    def expert_load_max(self) -> float:
        """Over layers, the busiest expert's token-slots over the mean (1.0: even); nan without tokens."""
        ratios = [max(row) * len(row) / sum(row) for row in self.load if sum(row) > 0]
        return max(ratios) if ratios else math.nan

    @property
    def dead_experts(self) -> int:
        """Experts that got no token this step, summed over layers."""
        return sum(1 for row in self.load for count in row if count == 0)


@dataclass
class _Capture:
    mask: torch.Tensor | None
    counts: list[torch.Tensor]
    logits: list[torch.Tensor]


class RouterTerms:
    """The hooks on every AutoEP router of `model`, and the step's aux loss, z-loss and load from what they saw."""

    def __init__(self, model: nn.Module, *, aux_coef: float, z_coef: float, scope: str, form: str = "transformers"):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.layers = [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]
        if not self.layers:
            raise ValueError("no AutoEP MoE layer in the model")
        self.model = model
        self.aux_coef, self.z_coef, self.scope, self.form = aux_coef, z_coef, scope, form
        self.num_experts, self.top_k = self.layers[0].num_experts, self.layers[0].top_k
        self._capture: _Capture | None = None
        self._logits: torch.Tensor | None = None
        self._hooks = []
        for layer in self.layers:
            self._hooks.append(layer.router.gate.register_forward_hook(self._on_logits))
            self._hooks.append(layer.router.register_forward_hook(self._on_routing))

    def summary(self, grad_accum: int) -> str:
        aux = f"{self.aux_coef:g} ({self.form} form, {self.scope} scope)" if self.aux_coef else "off"
        if self.needs_counting_pass(grad_accum):
            aux += ", a counting forward of the step's micro-batches first (accumulation)"
        return f"router: load-balancing loss {aux}, z-loss {f'{self.z_coef:g}' if self.z_coef else 'off'}"

    def needs_counting_pass(self, micro_batches: int) -> bool:
        return bool(self.aux_coef) and self.scope == "global" and micro_batches > 1

    def remove(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # hooks -----------------------------------------------------------------------------------------------

    def _on_logits(self, gate, args, logits):
        if self._capture is not None:
            self._logits = logits

    def _on_routing(self, router, args, output):
        capture = self._capture
        if capture is None:
            return
        logits, self._logits = self._logits, None
        selected, routed = output[1], output[2]
        mask = capture.mask
        if mask is None:
            capture.counts.append(routed.float())
        else:
            slots = mask.repeat_interleave(self.top_k)
            capture.counts.append(torch.zeros(self.num_experts, device=slots.device).index_add_(
                0, selected.reshape(-1), slots))
        if torch.is_grad_enabled():  # not the counting pass
            # Terms computed in loss(): ops here would run in a checkpointed layer's forward but not in its recompute
            capture.logits.append(logits)

    @contextlib.contextmanager
    def _capturing(self, micro: MicroBatch):
        self._capture = _Capture(real_token_mask(micro), [], [])
        try:
            yield self._capture
        finally:
            self._capture, self._logits = None, None

    # the step --------------------------------------------------------------------------------------------

    def start_step(self, micro_batches: list[MicroBatch], *, real_tokens: int, nonempty_micro_batches: int,
                   device: torch.device):
        """Before the step's first forward (`micro_batches` on the host): the global totals the terms divide by,
        and the counting pass when the step accumulates micro-batches under the global scope."""
        self.real_tokens = max(real_tokens, 1)
        self.nonempty = max(nonempty_micro_batches, 1)
        layers, experts = len(self.layers), self.num_experts
        self.step_counts = torch.zeros(layers, experts, device=device)
        self.aux_sum = torch.zeros((), device=device)
        self.z_sum = torch.zeros((), device=device)
        self.global_counts = None
        self.current: _Capture | None = None
        if self.needs_counting_pass(len(micro_batches)):
            body = causal_lm_of(self.model).model
            counts = torch.zeros(layers, experts, device=device)
            with torch.no_grad():
                for micro in micro_batches:
                    micro = micro.to(device)
                    with self._capturing(micro) as capture:
                        body(**micro.inputs, use_cache=False)
                    counts += torch.stack(capture.counts)
            self.global_counts = _all_reduced(counts)

    @contextlib.contextmanager
    def micro_batch(self, micro: MicroBatch):
        """Around one training forward: what the routers see is this micro-batch's."""
        with self._capturing(micro) as capture:
            yield
        self.current = capture
        self.current_tokens = micro.num_tokens

    def loss(self) -> torch.Tensor:
        """The router terms of the micro-batch just run: add to its loss before its backward (they sum, over the
        step's micro-batches and ranks, to the step's aux loss plus z-loss)."""
        capture, layers = self.current, len(self.layers)
        if len(capture.counts) != layers:
            raise RuntimeError(f"the routers ran {len(capture.counts)} times in one forward, expected {layers}")
        counts = torch.stack(capture.counts)
        self.step_counts += counts
        total = torch.zeros((), device=counts.device)
        logits = [logits.float() for logits in capture.logits]  # the router scores in float32 too
        if self.aux_coef:
            probs = torch.stack([_token_sum(torch.softmax(x, dim=-1), capture.mask) for x in logits])
            if self.scope == "global":
                if self.global_counts is None:  # one micro-batch a step: this forward's counts are the step's
                    self.global_counts = _all_reduced(counts.clone())
                total = total + self.aux_coef * self._balance(self.global_counts, probs, self.real_tokens)
            elif self.current_tokens:
                total = total + self.aux_coef / self.nonempty * self._balance(counts, probs, self.current_tokens)
            self.aux_sum += total.detach()
        if self.z_coef:
            squares = torch.stack([_token_sum(torch.logsumexp(x, dim=-1).square(), capture.mask) for x in logits])
            z = self.z_coef / (layers * self.real_tokens) * squares.sum()
            self.z_sum += z.detach()
            total = total + z
        self.current = None
        return total

    def _balance(self, counts: torch.Tensor, probs: torch.Tensor, tokens: int) -> torch.Tensor:
        """The load-balancing loss over coef of token-slot counts and probability sums [L, E] of `tokens` tokens."""
        layers, experts = counts.shape
        if self.form == "transformers":
            return experts * (counts.sum(0) * probs.sum(0)).sum() / (layers * tokens) ** 2
        return experts / layers * (counts * probs).sum() / (tokens ** 2 * self.top_k)

    def step_totals(self) -> torch.Tensor:
        """This rank's [aux, z, counts (L x E)] of the step, float64, for the end-of-step sum over ranks."""
        return torch.cat([self.aux_sum.view(1), self.z_sum.view(1), self.step_counts.flatten()]).double()

    def read(self, totals: list[float]) -> RouterStats:
        """RouterStats from step_totals() summed over ranks."""
        experts = self.num_experts
        load = [totals[2 + i * experts: 2 + (i + 1) * experts] for i in range(len(self.layers))]
        return RouterStats(aux_loss=totals[0], z_loss=totals[1], load=load)


def _token_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over the real tokens (dim 0) of per-token values."""
    return values.sum(0) if mask is None else mask @ values


def _all_reduced(tensor: torch.Tensor) -> torch.Tensor:
    """Summed over all ranks, without waiting on the host (NCCL orders it on the stream)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def resolve_aux_coef(requested: float | None, model_config) -> float:
    """--router-aux-loss-coef, or the model config's router_aux_loss_coef when left out."""
    return requested if requested is not None else float(getattr(model_config, "router_aux_loss_coef", 0.0))
