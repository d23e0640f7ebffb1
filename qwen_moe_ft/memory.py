"""Per-GPU memory of fine-tuning (full or LoRA) with ZeRO-2 + AutoEP, before launching.

    python -m qwen_moe_ft.memory [--config RECIPE] [--model DIR] [--gpus N] [--gpu-gib G] [--ep-size 8]
                                 [--tokens 4096] [--grad-accum 1] [--gate-up-recompute] [--adam-states bf16]
                                 [--lora BOOL] [--activation-checkpointing BOOL] [--checkpoint-layers all|N|auto]
                                 [--loss-impl auto|triton|torch|chunked|liger|cce] [--master-weights fp32|bf16]

--gpus and --gpu-gib default to the GPUs of the machine it runs on (8 x 80 GB H100 without a GPU), so run it
where the training will run.

Persistent: bf16 weights of the dense part and of this GPU's experts; fp32 master weights and two Adam moments
(bf16 by default, --adam-states; of the masters only the low 16 bits with the fast path: the bf16 weights are
their high half), ZeRO-2-partitioned (dense over all GPUs, each expert over its
expert-data-parallel group, so both come to 1/GPUs of the whole); the fused gate/up weight copies (one layer's
with --gate-up-recompute). The step adds, at whichever of its moments is largest:
- the loss: the activations of every layer kept (and the inputs of the recomputed ones) and the loss's memory:
  the plain loss's backward holds three fp32 [tokens, vocab] tensors, the chunked one a chunk's logits and the
  gradients it sums (--loss-impl auto chooses it above 8192 tokens a micro-batch, where the logits would not fit,
  or where it keeps more layers), the fused kernels nothing counted; with gradient accumulation, the earlier
  micro-batches' bf16 gradient partition too;
- a recomputed layer's backward: the gradients, every recomputed layer's input and that layer's activations;
- the optimizer step: the gradients.
Checked against one-GPU H100 peaks, including the allocations alive at the peak of a 32768-token step
(BENCHMARKS.md "Memory"); the multi-GPU partitioning terms follow DeepSpeed's ZeRO-2 and are not yet measured.

LoRA: the bf16 base weights are frozen, so the gradients, master weights and moments are the LoRA factors'
only, and no gate/up copies are kept. Where it matters, the fewest layers to recompute for the GPU is printed;
--checkpoint-layers auto (train.py) takes it. The LoRA terms were checked against one-GPU H200 and H100 peaks of
the 48-layer model at 4096 and 32768 tokens.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

GIB = 2**30
ADAM_STATE_BYTES = {"bf16": 2, "fp32": 4}


# Bytes a parameter of each kind of master weight: fp32 (DeepSpeed's), only the fp32 master's low 16 bits (the fast
# path's master_low_bits: the bf16 weight is its high half), none (--master-weights bf16: the bf16 weight is the
# master)
MASTER_BYTES = {"fp32": 4, "low_bits": 2, "bf16": 0}
MASTERS_NAMED = {"fp32": "fp32 masters", "low_bits": "fp32 masters as low bits", "bf16": "bf16 weights as the masters"}


def zero2_bytes_per_param(adam_states: str, masters: str = "fp32") -> int:
    """The master weight (MASTER_BYTES[masters]), Adam's m and v; the bf16 gradient is GRADIENT_BYTES."""
    return MASTER_BYTES[masters] + 2 * ADAM_STATE_BYTES[adam_states]


GRADIENT_BYTES = 2  # the bf16 gradient partition: from the backward to the optimizer step, or kept while accumulating
# Activations saved for the backward per token and decoder layer (bf16, top-8 of 128 experts, the fast path), from
# the allocations alive at the peak of the 4-layer step at one 32768-token document on an H100 80GB (commit
# 8de37ea, BENCHMARKS.md "Memory"): per layer the experts' gathered input rows (32 KiB a token) and output rows (32),
# gate/up (24) and SwiGLU's output (12), norms, projections and attention (~45).
ACTIVATION_BYTES_PER_TOKEN_LAYER = 145 * 1024
# The same for LoRA's unmerged experts (model/lora_expert_mlp.py: no input rows or SwiGLU output kept) and attention
# LoRA, from the peaks of the 48-layer Qwen3-30B-A3B at 4096 tokens with 16 and 28 layers recomputed (76.715 and
# 72.189 GiB, H200, commit 9c19195, BENCHMARKS.md "Memory"): 0.377 GiB a layer kept.
LORA_ACTIVATION_BYTES_PER_TOKEN_LAYER = 96.5 * 1024
# Alive besides in a LoRA layer's backward, from the peak with every layer recomputed at 32768 tokens (75.66 GiB,
# H100 80GB, commit 2292216): the expert rows' gradient arriving (32 KiB), gate/up's gradients (24), the input rows'
# gradient and a product added to it (64), less what is freed on the way.
LORA_BACKWARD_BYTES_PER_TOKEN_LAYER = 83 * 1024
# The plain torch loss peaks in its backward: log-softmax's fp32 output, the fp32 gradient arriving at it and the one
# it passes on (bf16 logits and their fp32 copy are freed by then, so the forward's 2 + 4 + 4 stays below)
LOGIT_BYTES = 4 + 4 + 4
# The chunked loss (loss.py:ChunkedLinearCrossEntropy) peaks in its forward: one chunk's bf16 logits and their fp32
# copy, then the fp32 softmax and its bf16 gradient (see loss_bytes for the rest)
CHUNK_LOGIT_BYTES = 2 + 4
# --loss-impl as the estimate counts it: liger's and cut-cross-entropy's chunks are not counted (within 1% of the
# measured peaks without them)
LOSS_KINDS = {"torch": "torch", "triton": "in_place", "chunked": "chunked", "liger": "fused", "cce": "fused"}
H100_GIB = 79.2  # an H100 80GB as torch sees it (get_device_properties().total_memory; nvidia-smi says 81559 MiB)
# Left free when choosing how many layers to recompute (--checkpoint-layers auto, the suggestions) and whether the
# logits fit: the CUDA context, the allocator's fragmentation, which the peaks measured here
# (torch.cuda.max_memory_allocated) do not count, and the estimate's own error (within 2% of the measured peaks).
HEADROOM_GIB = 5.0
# --loss-impl auto takes the chunked loss for the room it leaves only where that keeps at least this many more layers'
# activations than the whole logits: its chunks cost 15 ms a 8192-token micro-batch more than torch's loss and 33 ms
# more than the Triton loss (H100, BENCHMARKS.md), about what recomputing 5 and 10 layers' forward costs there.
CHUNKED_LOSS_MIN_KEPT_LAYERS = 8
BUCKET_BYTES = (50_000_000 + 500_000_000) * 2  # ZeRO-2 reduce and all-gather buckets of ds_configs/zero2_ep.json, bf16


PARTS = ("weights", "zero2_states", "gate_up_copies", "buckets", "gradients", "accumulation", "activations", "logits",
         "recompute")


@dataclass
class MemoryEstimate:
    """Bytes on one GPU: the persistent parts (weights, optimizer states, gate/up copies, buckets), and what the
    step adds at each of its possible peaks: the loss (earlier micro-batches' gradients, the activations, the loss's
    memory), a recomputed layer's backward (the gradients, the recomputed layers' inputs and one layer's activations)
    or the optimizer step (the gradients)."""
    weights: float
    zero2_states: float  # fp32 master weights and Adam moments, ZeRO-partitioned
    gate_up_copies: float
    buckets: float
    gradients: float  # the bf16 gradient partition, alive from the backward through the optimizer step
    accumulation: float  # the same, kept through the forward of the next micro-batch while accumulating
    activations: float
    logits: float
    recompute: float  # in a recomputed layer's backward: every recomputed layer's input and one layer's activations

    @property
    def phases(self) -> dict[str, float]:
        persistent = self.weights + self.zero2_states + self.gate_up_copies + self.buckets
        return {"the loss": persistent + self.accumulation + self.activations + self.logits,
                "a recomputed layer's backward": persistent + self.gradients + self.recompute,
                "the optimizer step": persistent + self.gradients}

    @property
    def peak_at(self) -> str:
        return max(self.phases.items(), key=lambda item: item[1])[0]

    @property
    def total(self) -> float:
        return max(self.phases.values())

    def table(self) -> str:
        rows = [(k, getattr(self, k)) for k in PARTS]
        return "\n".join([f"{k:<14}{v / GIB:8.2f} GiB" for k, v in rows] +
                         [f"{'peak':<14}{self.total / GIB:8.2f} GiB  (in {self.peak_at})"])


def parameter_counts(config) -> tuple[int, int]:
    """(dense, expert) parameter counts of a Qwen3-MoE config (norms included in dense)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    attn = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 2 * head_dim
    router = config.num_experts * hidden
    dense = layers * (attn + router + 2 * hidden) + 2 * config.vocab_size * hidden + hidden
    expert = layers * config.num_experts * 3 * hidden * config.moe_intermediate_size
    return dense, expert


def lora_parameter_counts(config, rank: int, targets: list[str]) -> tuple[int, int]:
    """(attention, expert) LoRA parameter counts of model/lora.py's adapters at `rank`, all experts."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    # q, k, v: hidden -> width; o: q -> hidden; each an A [r, in] and a B [out, r]
    attn = rank * ((hidden + q) + 2 * (hidden + kv) + (q + hidden)) if "attn" in targets else 0
    # per expert: gate/up A [r, H], B [2I, r]; down A [r, I], B [H, r]
    inter = config.moe_intermediate_size
    expert = config.num_experts * rank * (2 * hidden + 3 * inter) if "experts" in targets else 0
    return layers * attn, layers * expert


def expert_output_row_bytes(config) -> int:
    """The experts' bf16 output rows a token keeps for AutoEP's weighted combine (top_k rows of the hidden size, 32
    KiB for Qwen3-30B-A3B); at EP=1 the fast path applies the scores in the experts' SwiGLU and sums the rows
    unweighted, keeping none (fastpath/local_dispatch.py; measured 1.0 GiB less at 4 layers and 8192 tokens)."""
    return 2 * config.num_experts_per_tok * config.hidden_size


def loss_bytes(config, loss: str, tokens: int, lm_head_trains: bool) -> float:
    """Memory of the loss at its peak for `tokens` tokens: `loss` one of LOSS_KINDS' values."""
    vocab, hidden = config.vocab_size, config.hidden_size
    if loss == "torch":
        return LOGIT_BYTES * tokens * vocab
    if loss == "in_place":  # logits_cross_entropy.py: the bf16 logits, their gradient written over them, then the LM
        # head's backward beside them: the hidden states' bf16 gradient and, where the head trains, its weight's
        return 2 * tokens * vocab + 2 * tokens * hidden + 2 * vocab * hidden * lm_head_trains
    if loss == "chunked":
        from .loss import CHUNK_TOKENS

        chunk, head = min(tokens, CHUNK_TOKENS), vocab * hidden * lm_head_trains
        # kept through it: the bf16 gradient w.r.t. the hidden states and, where the LM head trains, its fp32 sum;
        # beside a chunk's bf16 gradient (after its fp32 softmax is freed), that chunk's bf16 product for the sum
        return 2 * tokens * hidden + 4 * head + max(CHUNK_LOGIT_BYTES * chunk * vocab, 2 * chunk * vocab + 2 * head)
    return 0


def estimate(config, *, gpus: int, ep_size: int, tokens: int, grad_accum: int = 1, gate_up_recompute: bool = False,
             loss: str = "torch", adam_states: str = "bf16", lora_rank: int = 0,
             lora_targets: tuple[str, ...] = ("attn", "experts"), recomputed_layers: int = 0,
             expert_output_rows: bool | None = None, masters: str = "fp32") -> MemoryEstimate:
    """Peak bytes on one GPU for micro-batches of `tokens` tokens; LoRA of `lora_rank` (0: full fine-tuning);
    `recomputed_layers` of the decoder layers under activation checkpointing; `loss` torch, chunked or fused.
    `expert_output_rows`: whether full fine-tuning keeps the experts' output rows for the combine (default: with
    expert parallelism; see expert_output_row_bytes). `masters`: a MASTER_BYTES kind; LoRA's are fp32 whatever
    it says (the fast path keeps others only for full fine-tuning)."""
    layers = config.num_hidden_layers
    if not 0 <= recomputed_layers <= layers:
        raise ValueError(f"recomputed_layers {recomputed_layers}: the model has {layers} layers")
    dense, expert = parameter_counts(config)
    base = 2 * (dense + expert / ep_size)  # bf16 weights: the dense part and this GPU's experts
    if lora_rank:
        dense, expert = lora_parameter_counts(config, lora_rank, list(lora_targets))
        base += 2 * (dense + expert / ep_size)  # the factors' own bf16 weights, this GPU's experts'
    # The fused gate/up projection's concatenated bf16 gate+up weights of this GPU's experts: kept for every
    # layer (between steps too: expert_mlp.GateUpCache; measured +0.75 GiB per layer at EP=1, exactly their
    # size), or one layer's at a time when the backward rebuilds them. LoRA runs gate and up separately.
    gate_up_copy = 2 * (config.num_experts // ep_size) * 2 * config.moe_intermediate_size * config.hidden_size
    per_layer = LORA_ACTIVATION_BYTES_PER_TOKEN_LAYER if lora_rank else ACTIVATION_BYTES_PER_TOKEN_LAYER
    if not lora_rank and not (ep_size > 1 if expert_output_rows is None else expert_output_rows):
        per_layer -= expert_output_row_bytes(config)
    backward = LORA_BACKWARD_BYTES_PER_TOKEN_LAYER if lora_rank else 0  # full fine-tuning: within its 2% unmodelled
    kept = layers - recomputed_layers
    inputs = tokens * 2 * config.hidden_size * recomputed_layers  # what a recomputed layer keeps until its backward
    trained = (dense + expert) / gpus  # ZeRO-2 partitions: dense over every GPU, experts over their EDP group
    return MemoryEstimate(
        weights=base,
        zero2_states=zero2_bytes_per_param(adam_states, "fp32" if lora_rank else masters) * trained,
        gate_up_copies=0 if lora_rank else gate_up_copy * (1 if gate_up_recompute else layers),
        buckets=BUCKET_BYTES if gpus > 1 else 0,
        gradients=GRADIENT_BYTES * trained,
        # measured +5.80 GiB for 2 micro-batches of the 4-layer model on one H100; 2 bytes x 3.115e9 = 5.80 GiB
        accumulation=GRADIENT_BYTES * trained if grad_accum > 1 else 0,
        activations=tokens * per_layer * kept + inputs,
        logits=loss_bytes(config, loss, tokens, lm_head_trains=not lora_rank),
        # the backward reaches the recomputed (first) layers after the kept layers' activations and the loss's
        # memory are freed
        recompute=inputs + tokens * (per_layer + backward) if recomputed_layers else 0)


def fewest_recomputed_layers(gpu_bytes: float, **kwargs) -> int | None:
    """The fewest decoder layers to recompute for `estimate(**kwargs)` to fit `gpu_bytes`; None if even all do
    not."""
    layers = kwargs["config"].num_hidden_layers
    for recomputed in range(layers + 1):
        if estimate(**kwargs, recomputed_layers=recomputed).total <= gpu_bytes:
            return recomputed
    return None


def masters_of(model, fastpath, lora) -> str:
    """The MASTER_BYTES kind a train.py run keeps: --master-weights bf16 as asked; fp32 masters as the bf16 weights'
    low bits where the fast path's master_low_bits applies (bf16 weights, full fine-tuning, not skipped)."""
    from .fastpath import parse_skip

    if fastpath.master_weights == "bf16":
        return "bf16"
    low_bits = (fastpath.mode == "on" and model.dtype == "bf16" and not lora.enabled
                and "master_low_bits" not in parse_skip(fastpath.skip))
    return "low_bits" if low_bits else "fp32"


@dataclass(frozen=True)
class Workload:
    """What the estimate reads of a train.py run, taken from its config sections in one place (Workload.of)."""
    tokens: int  # per micro-batch (--max-tokens-per-batch)
    grad_accum: int = 1
    gate_up_recompute: bool = False
    adam_states: str = "bf16"
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ("attn", "experts")
    loss_impl: str = "auto"  # --loss-impl
    recomputed_layers: int | None = 0  # decoder layers recomputed; None: --checkpoint-layers auto
    masters: str = "low_bits"  # a MASTER_BYTES kind: low_bits is the fast path's for bf16 weights

    @classmethod
    def of(cls, *, model, data, optim, fastpath, lora, layers: int) -> Workload:
        """From the model, data, optim, fastpath and LoRA sections of a TrainConfig, for a model of `layers`
        decoder layers."""
        return cls(tokens=data.max_tokens_per_batch, grad_accum=optim.grad_accum,
                   gate_up_recompute=fastpath.gate_up_recompute, adam_states=fastpath.adam_states,
                   lora_rank=lora.rank if lora.enabled else 0, lora_targets=tuple(lora.target_list()),
                   loss_impl=model.loss_impl, recomputed_layers=model.recomputed_layers(layers),
                   masters=masters_of(model, fastpath, lora))

    def setting(self, config, *, gpus: int, ep_size: int, loss: str) -> dict:
        """estimate()'s keyword arguments (less recomputed_layers) on `gpus` GPUs computing the loss `loss` (a
        --loss-impl other than auto)."""
        return dict(config=config, gpus=gpus, ep_size=ep_size, tokens=self.tokens, grad_accum=self.grad_accum,
                    gate_up_recompute=self.gate_up_recompute, loss=LOSS_KINDS[loss], adam_states=self.adam_states,
                    lora_rank=self.lora_rank, lora_targets=self.lora_targets, masters=self.masters)


def logits_fit(setting: dict, gpu_gib: float, recomputed: int) -> bool:
    """--loss-impl auto's memory test: the estimated peak of `setting` with the whole logits (its loss) leaves
    HEADROOM_GIB of `gpu_gib` free, or the chunked loss would not lower it."""
    plain, chunked = (estimate(**{**setting, "loss": loss}, recomputed_layers=recomputed).total
                      for loss in (setting["loss"], "chunked"))
    return plain <= (gpu_gib - HEADROOM_GIB) * GIB or chunked >= plain


@dataclass
class RunPlan:
    """What train.py takes from the estimate: the loss (--loss-impl auto's choice, and why) and how many decoder
    layers recompute (--checkpoint-layers auto's choice)."""
    loss: str
    loss_why: str
    recomputed_layers: int


def plan_run(work: Workload, config, *, gpus: int, ep_size: int, gpu_gib: float, whole_loss: str | None = None
             ) -> RunPlan:
    """The loss and the recomputed layers of the run `work` on `gpus` GPUs of `gpu_gib` each. Under
    --checkpoint-layers auto, the fewest layers whose estimate leaves HEADROOM_GIB free (all where none does);
    with --loss-impl auto too, the loss in chunks where that recomputes at least CHUNKED_LOSS_MIN_KEPT_LAYERS fewer
    layers than the whole logits. `whole_loss`: auto's loss on the whole logits (default: this machine's, for a
    GPU)."""
    from .loss import select_loss_impl, whole_logits_loss

    layers = config.num_hidden_layers
    fixed = work.recomputed_layers

    def setting(loss: str) -> dict:
        return work.setting(config, gpus=gpus, ep_size=ep_size, loss=loss)

    def recomputed(loss: str) -> int:
        if fixed is not None:
            return fixed
        fewest = fewest_recomputed_layers((gpu_gib - HEADROOM_GIB) * GIB, **setting(loss))
        return layers if fewest is None else fewest

    whole = whole_loss or whole_logits_loss("cuda")
    if work.loss_impl != "auto":
        loss, why = work.loss_impl, ""
    elif (kept := recomputed(whole) - recomputed("chunked")) >= CHUNKED_LOSS_MIN_KEPT_LAYERS:
        loss, why = "chunked", f"auto: keeps {kept} more layers' activations than the whole logits would"
    else:
        fit = logits_fit(setting(whole), gpu_gib, recomputed(whole))
        loss, why = select_loss_impl("auto", "cuda", tokens=work.tokens, logits_fit=fit, whole=whole)
    return RunPlan(loss, why, recomputed(loss))


def overlap_reserve_note(fastpath, lora) -> str | None:
    """Where step_overlap will run (full fine-tuning on the fast path), what it does to the allocator's reserve,
    which the estimate (of allocations) leaves out, and how to give it up."""
    from .fastpath import overlap_asked, parse_skip

    if not overlap_asked(fastpath, lora):
        return None
    skip = parse_skip(fastpath.skip)
    return ("step_overlap (the optimizer's updates beside the next forward) has the allocator reserve more than the "
            "peak above: 11% more at 4 layers on an H100, 5% without it (docs/benchmark-history.md, 2026-12-07). If "
            f"the log's alloc_retries climbs, --fast-path-skip {','.join([*skip, 'step_overlap'])} gives that up for "
            "~9% of the step's time.")


def what_to_change(setting: dict, gpu_gib: float, recomputed: int) -> str | None:
    """The fewest layers to recompute that leave HEADROOM_GIB free, as the options that say it, where that differs
    from `recomputed`; None where it does not."""
    fewest = fewest_recomputed_layers((gpu_gib - HEADROOM_GIB) * GIB, **setting)
    margin = f"{HEADROOM_GIB:.0f} GiB left free"
    if fewest is None:
        return (f"recomputing every layer does not make it fit with {margin} either: fewer tokens per micro-batch "
                "(--max-tokens-per-batch), " + ("more GPUs" if setting["lora_rank"] else "more GPUs or LoRA"))
    if fewest == recomputed:
        return None
    if not fewest:
        return f"it fits without activation checkpointing ({margin}): --activation-checkpointing false"
    return (f"the fewest layers to recompute ({margin}): --activation-checkpointing true --checkpoint-layers {fewest}"
            " (or auto)")


def preflight_warning(work: Workload, config, *, gpus: int, ep_size: int, gpu_gib: float) -> str | None:
    """For train.py before it loads any weight: a warning where the estimated peak of the run `work` exceeds its
    GPU, with what to change; None where it fits."""
    plan = plan_run(work, config, gpus=gpus, ep_size=ep_size, gpu_gib=gpu_gib)
    setting = work.setting(config, gpus=gpus, ep_size=ep_size, loss=plan.loss)
    total = estimate(**setting, recomputed_layers=plan.recomputed_layers).total / GIB
    if total <= gpu_gib:
        return None
    change = what_to_change(setting, gpu_gib, plan.recomputed_layers)
    return (f"the estimated peak memory of this run is {total:.1f} GiB a GPU, more than this GPU's {gpu_gib:.1f} "
            f"(python -m qwen_moe_ft.memory gives the parts){'; ' + change if change else ''}")


def this_machine() -> tuple[int, float] | None:
    """(GPU count, GiB of GPU 0) of the machine this runs on; None without a GPU."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GIB


def _at_least(least: int):
    """An argparse type: an integer of at least `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"at least {least}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"more than 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    from .config import QWEN3_30B_A3B, REAL_MODEL, ConfigError, ModelConfig, TrainConfig, load_config
    from .model.loading import ModelLoadError, load_model_config
    from .parallel.sizes import choose_ep_size

    parser = argparse.ArgumentParser(prog="python -m qwen_moe_ft.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a train.py recipe: its micro-batch, accumulation, EP size, gate/up "
                        "recompute and loss are the defaults of the options below")
    parser.add_argument("--model", help="hub id or directory with config.json; default the recipe's model, or "
                        "Qwen3-30B-A3B's config.json shipped with the package")
    parser.add_argument("--gpus", type=_at_least(1), help="default: this machine's GPU count, or 8 without a GPU")
    parser.add_argument("--ep-size", type=int, help="default the recipe's, or 0: as train.py chooses (the largest "
                        "size dividing both the GPU count and the expert count)")
    parser.add_argument("--tokens", type=_at_least(1), help="tokens per micro-batch (--max-tokens-per-batch; one "
                        "document of 32768 tokens: 32768); default 4096")
    parser.add_argument("--grad-accum", type=_at_least(1), help="micro-batches per step; default 1")
    parser.add_argument("--gate-up-recompute", action="store_true", default=None)
    parser.add_argument("--adam-states", choices=sorted(ADAM_STATE_BYTES), help="dtype of the Adam moments; "
                        "default bf16, or the recipe's")
    parser.add_argument("--layers", type=_at_least(0), default=0, help="cut the model to this depth")
    parser.add_argument("--loss-impl", choices=("auto", *LOSS_KINDS), help="as train.py takes it, over the "
                        "recipe's (default auto: the whole logits with the Triton loss, or chunks above 8192 tokens or "
                        "where that keeps 8 or more layers' activations); liger and cce keep no logits")
    parser.add_argument("--gpu-gib", type=_positive_float, help="memory of one GPU, to say whether it fits (default: "
                        "this machine's GPU, or an H100 80GB's 79.2 GiB without a GPU)")
    # as train.py takes them (true/false), over the recipe's
    parser.add_argument("--lora", nargs="?", const="true", metavar="BOOL", help="LoRA of the recipe's rank and "
                        "targets (default rank 8, attn,experts)")
    parser.add_argument("--activation-checkpointing", nargs="?", const="true", metavar="BOOL",
                        help="recompute decoder layers in the backward (--checkpoint-layers of them; all by default)")
    parser.add_argument("--checkpoint-layers", help="with --activation-checkpointing: how many layers recompute: "
                        "all, a number, or auto (the fewest that leave 5 GiB free, as train.py chooses)")
    parser.add_argument("--master-weights", choices=("fp32", "bf16"), help="fp32 masters (default) or the bf16 "
                        "weights as the masters (no master memory)")
    args = parser.parse_args(argv)
    train_options = [f"--{name}={value}" for name, value in (
        ("lora", args.lora), ("activation-checkpointing", args.activation_checkpointing),
        ("checkpoint-layers", args.checkpoint_layers), ("master-weights", args.master_weights)) if value is not None]
    machine = this_machine()
    gpus_of = " (this machine's)" if machine and args.gpus is None else ""
    args.gpus = args.gpus if args.gpus is not None else machine[0] if machine else 8
    args.gpu_gib = args.gpu_gib or (machine[1] if machine else H100_GIB)
    overrides = dict(max_tokens_per_batch=args.tokens, grad_accum=args.grad_accum,
                     gate_up_recompute=args.gate_up_recompute, adam_states=args.adam_states, loss_impl=args.loss_impl)
    try:
        recipe = load_config((["--config", args.config] if args.config else []) + train_options).validate()
        # the hub's Qwen3-30B-A3B (the 30B recipes' model) is the config shipped with the package: no download
        args.model = args.model or (recipe.model.name if recipe.model.name not in ("", REAL_MODEL) else QWEN3_30B_A3B)
        config = load_model_config(ModelConfig(random_init=bool(args.layers), num_hidden_layers=args.layers),
                                   args.model)
        ep_size = choose_ep_size(recipe.parallel.ep_size if args.ep_size is None else args.ep_size, args.gpus,
                                 config.num_experts)
        cfg = TrainConfig.from_flat(**{**recipe.flat(), **{k: v for k, v in overrides.items() if v is not None}})
    except (ConfigError, ModelLoadError) as err:
        parser.error(str(err))
    layers = config.num_hidden_layers
    work = Workload.of(model=cfg.model, data=cfg.data, optim=cfg.optim, fastpath=cfg.fastpath, lora=cfg.lora,
                       layers=layers)
    if (fixed := work.recomputed_layers) is not None and fixed > layers:
        parser.error(f"--checkpoint-layers {fixed}: the model has {layers} decoder layers")
    # a plan for GPUs, made anywhere: torch's CUDA builds bring triton, so train.py's auto takes the Triton loss there
    plan = plan_run(work, config, gpus=args.gpus, ep_size=ep_size, gpu_gib=args.gpu_gib, whole_loss="triton")
    loss, why, recomputed = plan.loss, plan.loss_why, plan.recomputed_layers
    setting = work.setting(config, gpus=args.gpus, ep_size=ep_size, loss=loss)
    result = estimate(**setting, recomputed_layers=recomputed)
    what = f"LoRA rank {work.lora_rank} ({','.join(work.lora_targets)})" if work.lora_rank else "full fine-tuning"
    print(f"{args.model}: {layers} layers, {what}, {args.gpus} GPUs{gpus_of}, EP={ep_size}, "
          f"{work.tokens} tokens per micro-batch x {work.grad_accum}"
          f"{', gate/up recomputed' if work.gate_up_recompute else ''}, "
          f"{work.adam_states} Adam moments, {MASTERS_NAMED[work.masters]}, "
          f"{recomputed} of {layers} layers recomputed, loss {loss}{f' ({why})' if why else ''}")
    print(result.table())
    headroom = args.gpu_gib - result.total / GIB
    fits = headroom >= 0
    print(f"{'fits' if fits else 'does NOT fit'} a {args.gpu_gib:.1f} GiB GPU ({headroom:+.1f} GiB to spare; "
          "the allocator's fragmentation needs a few)")
    if note := overlap_reserve_note(cfg.fastpath, cfg.lora):
        print(note)
    recompute_asked = cfg.model.activation_checkpointing
    if (recompute_asked or not fits) and (change := what_to_change(setting, args.gpu_gib, recomputed)):
        print(change)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
