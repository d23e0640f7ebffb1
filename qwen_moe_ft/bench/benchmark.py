"""Benchmark one GPU: our training step against transformers' grouped_mm and against stock DeepSpeed ZeRO-2 +
AutoEP (our trainer with --fast-path off), same batches, same process tree.

transformers runs twice: `hf_grouped_mm_packed` (`hf_peft_lora_packed` with --lora) takes the step's documents as
one unpadded row with positions restarting per document, as TRL's packing or padding-free collation gives its users
(flash-attn 4's or 2's varlen kernel where installed, else sdpa with the block-diagonal mask transformers builds
from the positions); `hf_grouped_mm` (`hf_peft_lora`) pads micro-batches of the same token budget, what a naive
loop costs. Ratios are reported against both; the packed ones are the headline.

    python -m qwen_moe_ft.bench [--layers 2,4] [--tokens 8192] [--lengths full|chat|mixed] [--out bench.json]
    python -m qwen_moe_ft.bench --lora --layers 48 --tokens 4096 --lengths chat   # LoRA, whole model, one GPU
    python -m qwen_moe_ft.bench --layers 4 --tokens 32768 --lengths whole          # one 32k-token document a step
    python -m qwen_moe_ft.bench --full-length --stacks ours,hf_grouped_mm --runs 3  # three runs side by side

Each (stack, depth) runs in a fresh subprocess on a Qwen3-30B-A3B-shaped model cut to that depth
(random init, seeded). With two depths, per-layer costs are differences between them and the 48-layer
equivalent is rest + 48 x per-layer; with one depth, whole steps. `--lora` compares our LoRA (rank 16,
attention and experts) with transformers + PEFT LoRA of the same targets (`target_parameters` on the
experts), both with activation checkpointing unless `--no-activation-checkpointing`.

Each step's split follows the table, per stack and depth: forward+backward, of which the LM head + loss (CUDA
events from the final norm's output to the loss and back until its gradient reaches that output), and the
optimizer; and the shares of the step that the decoder layers (depth x their per-layer forward+backward, where
two depths give it), the head + loss, the optimizer and the rest (embedding, final norm, ...) take.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ..config import DEFAULT_DS_CONFIG, QWEN3_30B_A3B, TINY_MODEL
from ..data.rows import IGNORE
from ..flops import flops_per_token, mean_causal_context, peak_tflops
from .harness import markdown_table, require_cuda, reserved_by_stream, segment_growth, tool_parser, write_report
from .kernel_table import format_per_layer, per_layer_table, profile_step, profile_steps, slowest_against_fastest
from .runs import per_layer_cell, runs_table
from ..metrics import StepTimer
from ..model.attention import flash_attn_version
from ..data.packing import collate_packed, collate_padded, plan_micro_batches

# ours: the trainer with the fast path; deepspeed_stock: the same trainer with --fast-path off
STACKS = ("ours", "deepspeed_stock", "hf_grouped_mm_packed", "hf_grouped_mm")
LORA_STACKS = ("ours", "hf_peft_lora_packed", "hf_peft_lora")
ALL_STACKS = tuple(dict.fromkeys((*STACKS, *LORA_STACKS)))
BASELINES = ("hf_grouped_mm_packed", "hf_grouped_mm", "deepspeed_stock", "hf_peft_lora_packed", "hf_peft_lora")
LORA_RANK, LORA_ALPHA = 16, 32.0
# Document lengths (log-normal, cut to 64..4096): "mixed" a long tail of short SFT rows (median ~550 tokens),
# "chat" chat-like conversations (median ~1.5k tokens)
LOG_NORMAL = {"mixed": (6.3, 0.9), "chat": (7.3, 0.6)}


def document_lengths(tokens: int, lengths: str, rng: random.Random) -> list[int]:
    """Lengths summing to `tokens`: 4096 each ("full"), one document of them all ("whole"), or drawn from a fixed
    log-normal mix."""
    if lengths == "whole":
        return [tokens]
    if lengths == "full":
        return [4096] * (tokens // 4096)
    mu, sigma = LOG_NORMAL[lengths]
    out = []
    while sum(out) < tokens:
        out.append(min(4096, max(64, int(rng.lognormvariate(mu, sigma)))))
    out[-1] -= sum(out) - tokens
    return [n for n in out if n > 0]


def make_batches(count: int, tokens: int, lengths: str, vocab: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        docs = []
        for n in document_lengths(tokens, lengths, rng):
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            docs.append({"input_ids": ids, "labels": list(ids)})
        batches.append(docs)
    return batches


def trainer_config(model: str, depth: int, tokens: int, attn: str, steps: int, scratch: str, seed: int, **settings):
    """Our trainer's config for the randomly initialised model of `model`'s config cut to `depth` layers, one packed
    micro-batch of `tokens` a step, bf16, nothing exported; `settings`: the run's own options."""
    from ..config import TrainConfig

    return TrainConfig.from_flat(model=model, tokenizer=TINY_MODEL, random_init=True, num_hidden_layers=depth,
                                 dtype="bf16", attn=attn, packing=True, max_tokens_per_batch=tokens,
                                 max_seq_len=min(4096, tokens), max_steps=steps, output_dir=scratch,
                                 progress_bar=False, export_hf=False, seed=seed, **settings)


def _run_ours(args, batches):
    from ..model.loading import causal_lm_of
    from ..train import Trainer

    cfg = trainer_config(args.model, args.depth, args.tokens, args.attn, len(batches), args.scratch, args.seed,
                         lr=1e-5, warmup_steps=0, ds_config=args.ds_config, loss_impl=args.loss_impl,
                         zero_stage=args.zero_stage,
                         fused_kernels=args.fused_kernels if args.stack == "ours" else "auto",
                         gate_up_recompute=args.gate_up_recompute, adam_states=args.adam_states,
                         expert_kernels=args.expert_kernels if args.stack == "ours" else "torch",
                         master_weights=args.master_weights if args.stack == "ours" else "fp32",
                         router_aux_loss_coef=args.router_aux_loss_coef, router_z_loss_coef=args.router_z_loss_coef,
                         fast_path="on" if args.stack == "ours" else "off", **_skip_option(args), **_lora_options(args))
    trainer = Trainer(cfg)
    trainer.engine.train()

    def step(docs, i, timer):
        return trainer.run_step([collate_packed(docs)], step=i + 1, epoch=1, timer=timer).loss

    return step, (f"{trainer.attn_backend}, loss {trainer.loss_impl}, kernels {trainer.fused_kernels}, "
                  f"{trainer.recompute}; {trainer.fast_path.summary()}"), causal_lm_of(trainer.engine)


def _skip_option(args) -> dict:
    """Our stack's --fast-path-skip where the bench was given one (else the trainer's default)."""
    return {"fast_path_skip": args.fast_path_skip} if args.fast_path_skip is not None and args.stack == "ours" else {}


def _lora_options(args) -> dict:
    if not args.lora:
        return {}
    return dict(lora=True, lora_targets="attn,experts", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, ep_size=1,
                activation_checkpointing=args.activation_checkpointing, checkpoint_layers=args.checkpoint_layers)


def _peft_lora(model, args):
    """What a transformers user runs for LoRA of a Qwen3-MoE model: PEFT on the attention projections and, through
    target_parameters, on the fused expert weights; activation checkpointing to fit."""
    from peft import LoraConfig, get_peft_model

    from ..model.checkpointing import enable_activation_checkpointing

    if args.activation_checkpointing:
        enable_activation_checkpointing(model, 0 if args.checkpoint_layers in ("all", "auto") else
                                        int(args.checkpoint_layers))
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))


def _packed_attention() -> str:
    """transformers' attention for one row of packed documents: the flash-attn our trainer would take (its varlen
    kernel), else sdpa."""
    version = flash_attn_version()
    if version == 4 and torch.cuda.get_device_capability()[0] >= 9:
        return "flash_attention_4"
    return "flash_attention_2" if version == 2 else "sdpa"


def _run_hf(args, batches):
    from transformers import AutoModelForCausalLM, set_seed

    from ..config import ModelConfig
    from ..model.loading import causal_lm_of, load_model_config

    packed = args.stack.endswith("_packed")
    attention = _packed_attention() if packed else "sdpa"
    set_seed(args.seed)
    config = load_model_config(ModelConfig(random_init=True, num_hidden_layers=args.depth), args.model)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention,
                                                 experts_implementation="grouped_mm")
    if args.lora:
        model = _peft_lora(model, args)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=True)

    def micro_batches(docs, i):
        if packed:  # one row; transformers finds the documents from the restarting positions
            row = collate_packed(docs)
            inputs = {k: row.inputs[k] for k in ("input_ids", "position_ids")}
            return [(inputs, row.shift_labels, row.num_label_tokens)]
        # What a user of padded batches runs: micro-batches within the same token budget, accumulated.
        lengths = [len(d["input_ids"]) for d in docs]
        plan = plan_micro_batches(lengths, args.tokens, packing=False, seed=i, epoch=1, shuffle_buffer=len(docs))
        padded = [collate_padded([docs[j] for j in batch], pad_id=0) for batch in plan]
        return [(m.inputs, m.shift_labels, m.num_label_tokens) for m in padded]

    def step(docs, i, timer):
        micro = [({k: v.to("cuda") for k, v in inputs.items()}, labels.to("cuda"), n)
                 for inputs, labels, n in micro_batches(docs, i)]
        label_tokens = sum(n for *_, n in micro)
        timer.begin()
        total = torch.zeros((), device="cuda")
        for inputs, labels, _ in micro:
            logits = model(**inputs, use_cache=False).logits.float()
            loss_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                         ignore_index=IGNORE, reduction="sum")
            (loss_sum / label_tokens).backward()
            total += loss_sum.detach()
            del logits, loss_sum
        timer.mark("forward_backward")
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total) / label_tokens

    described = f"{attention} (one packed row)" if packed else "sdpa (padded)"
    return step, described + (", PEFT LoRA" if args.lora else ""), causal_lm_of(model)


def _timing_event():
    return torch.cuda.Event(enable_timing=True)


class HeadLossSpans:
    """The LM head and the loss of each micro-batch, forward and backward, as a pair of events on the current
    stream: one as the final norm's output is produced, one as its gradient arrives (the head's and the loss's
    backward done); what runs between the loss and its backward (ours: the router's loss terms, DeepSpeed's
    backward set-up) counts with them. Nothing synchronises: read the spans after the step has. The final norm sits
    outside the decoder layers, so activation checkpointing never runs it again.

        with HeadLossSpans(causal_lm) as head_loss:
            step(...); timer.end(); head_loss.take_ms()
    """

    def __init__(self, causal_lm: torch.nn.Module, new_event=_timing_event):
        self.norm = causal_lm.model.norm
        self.new_event = new_event
        self.spans = []
        self.handle = None

    def __enter__(self):
        self.handle = self.norm.register_forward_hook(self._on_norm_output)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.spans = []

    def _on_norm_output(self, module, args, output):
        if not output.requires_grad:  # no backward to wait for (e.g. an evaluation)
            return
        start, end = self.new_event(), self.new_event()
        start.record()

        def on_gradient(grad):
            end.record()

        output.register_hook(on_gradient)
        self.spans.append((start, end))

    def take_ms(self) -> float:
        """The spans since the last call, summed over the micro-batches (ms); forgets them."""
        spans, self.spans = self.spans, []
        return sum(start.elapsed_time(end) for start, end in spans)


def host_profile(step, steps: int, top: int = 40) -> dict[str, str]:
    """`steps` calls of step(timer, i) under cProfile: pstats' tables of the `top` functions by own time and by
    cumulative time. What the host does between kernels where the GPU waits for it (cProfile slows Python-heavy
    calls: compare shares, not times)."""
    import cProfile
    import io
    import pstats

    timer = StepTimer(torch.device("cuda"))
    profile = cProfile.Profile()
    for i in range(steps):
        profile.enable()
        step(timer, i)
        timer.end()
        profile.disable()
    tables = {}
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).strip_dirs().sort_stats(order).print_stats(top)
        tables[order] = out.getvalue()
    return tables


def worker(args) -> dict:
    """One stack at one depth: median step, forward+backward, LM head + loss and optimizer times after warm-up."""
    batches = make_batches(args.warmup + args.steps, args.tokens, args.lengths, vocab=151936, seed=args.seed)
    if args.memory_history:  # from before the model is built: its memory is the first the allocator takes
        torch.cuda.memory._record_memory_history(stacks="python")
    step, attention, causal_lm = (_run_hf if args.stack.startswith("hf_") else _run_ours)(args, batches)
    if args.no_gc:
        gc.collect()
        gc.freeze()
        gc.disable()
    timer = StepTimer(torch.device("cuda"))  # resets the peak each step: the reported peak is the last step's
    losses, steps, fwd_bwd, head_loss_ms = [], [], [], []
    with HeadLossSpans(causal_lm) as head_loss:
        for i, docs in enumerate(batches):
            loss = step(docs, i, timer)
            seconds = timer.end()
            losses.append(loss)
            spans_ms = head_loss.take_ms()
            if i >= args.warmup:
                steps.append(seconds)
                fwd_bwd.append(timer.marks["forward_backward"])
                head_loss_ms.append(spans_ms)
    kernels = profile_step(lambda t: step(batches[-1], len(batches), t)) if args.profile else None
    trace = None
    if args.trace_steps:
        export = None
        if args.trace_export:
            export = f"{Path(args.out).with_suffix('')}_{args.stack}_{args.depth}L.trace.json.gz"
        timelines = profile_steps(lambda t, i: step(batches[args.warmup + i % args.steps], len(batches) + 1 + i, t),
                                  args.trace_steps, export)
        trace = dict(steps=[{k: round(v, 2) for k, v in s.items() if k != "kernels"} for s in timelines],
                     slowest_against_fastest=slowest_against_fastest(timelines))
    host = host_profile(lambda t, i: step(batches[args.warmup + i % args.steps], len(batches) + 1 + i, t),
                        args.host_profile) if args.host_profile else None
    step_s, fb_s = statistics.median(steps), statistics.median(fwd_bwd)
    streams = {0: "default", torch.cuda.current_stream().cuda_stream: "current (the step's)"}
    quartiles = statistics.quantiles(steps, n=4) if len(steps) > 1 else [step_s, step_s, step_s]
    lengths = [len(d["input_ids"]) for d in batches[0]]
    return dict(stack=args.stack, depth=args.depth, attention=attention, step_ms=1e3 * step_s,
                step_ms_spread=1e3 * (quartiles[2] - quartiles[0]),
                fwd_bwd_ms=1e3 * fb_s, optimizer_ms=1e3 * (step_s - fb_s),
                # of forward+backward: the final norm's output to the loss and back (LM head, loss)
                head_loss_ms=statistics.median(head_loss_ms), peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                # what the allocator held at the peak: allocated + its fragmentation (the headroom memory.py leaves)
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                # cudaMalloc retries after freeing the cache: each synchronises the device (a host stall)
                alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0),
                # segments are given back only by a retry (alloc_retries): what each stream holds at the end it reserved
                reserved_by_stream=reserved_by_stream(torch.cuda.memory_snapshot(), streams),
                pool_growth=_pool_growth(streams) if args.memory_history else None,
                tokens=sum(lengths), mean_context=mean_causal_context(lengths), losses=losses,
                steps_ms=[round(1e3 * t, 2) for t in steps], fwd_bwd_steps_ms=[round(1e3 * t, 2) for t in fwd_bwd],
                head_loss_steps_ms=[round(t, 2) for t in head_loss_ms],
                gpu=torch.cuda.get_device_name(), kernels=kernels, trace=trace, host_profile=host)


def _pool_growth(streams: dict[int, str]) -> dict[str, list[list]]:
    """--memory-history: the sites that took new device memory, per stream (harness.segment_growth)."""
    traces = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)
    return segment_growth(traces, streams)


def median_standard_error(interquartile_ms: float, n: int) -> float:
    """The standard error of a median of n step times with this interquartile range, as for normally distributed
    times: sigma = IQR / 1.349, and the median's error sqrt(pi / 2) = 1.2533 times the mean's (large n)."""
    return 1.2533 * interquartile_ms / 1.349 / n ** 0.5


def summarise(results: list[dict], depths: tuple[int, ...], peak: float, frozen_weights: bool = False) -> dict:
    """Per stack: whole steps at the deepest depth (tokens/s, MFU, peak memory) and, given two depths, per-layer
    figures from their difference; ratios of each baseline's time to ours. frozen_weights: a LoRA step."""
    from ..config import ModelConfig
    from ..model.loading import load_model_config

    low, high = depths[0], depths[-1]
    config_at = {d: load_model_config(ModelConfig(random_init=True, num_hidden_layers=d), QWEN3_30B_A3B) for d in depths}
    out = {}
    for stack in {r["stack"] for r in results}:
        by_depth = {r["depth"]: r for r in results if r["stack"] == stack}
        a, b = by_depth[low], by_depth[high]
        span = high - low
        tokens_per_s = b["tokens"] / (b["step_ms"] / 1e3)
        step_flops = flops_per_token(config_at[high], b["mean_context"], frozen_weights=frozen_weights)
        whole_steps = dict(attention=b["attention"], **{f"step_ms_{d}L": by_depth[d]["step_ms"] for d in depths},
                           peak_mem_gib=b["peak_mem_gib"], tokens_per_s=tokens_per_s,
                           step_mfu=tokens_per_s * step_flops / 1e12 / peak, first_losses=a["losses"][:3],
                           **step_breakdowns(by_depth))
        if span == 0:
            out[stack] = whole_steps
            continue
        if b["step_ms"] - a["step_ms"] <= max(a.get("step_ms_spread", 0.0), b.get("step_ms_spread", 0.0)):
            # The added layers changed the median step by less than steps vary (e.g. padded batches of
            # mixed lengths, dominated by the LM head): a per-layer difference would be noise.
            out[stack] = dict(whole_steps, per_layer_within_noise=True)
            continue
        per_layer = {k: (b[k] - a[k]) / span for k in ("step_ms", "fwd_bwd_ms", "optimizer_ms")}
        layer_flops = (step_flops - flops_per_token(config_at[low], b["mean_context"], frozen_weights=frozen_weights)) / span
        layer_tflops = layer_flops * b["tokens"] / (per_layer["step_ms"] / 1e3) / 1e12
        fb_tflops = layer_flops * b["tokens"] / (per_layer["fwd_bwd_ms"] / 1e3) / 1e12
        # Outside the decoder layers: embedding, final norm, LM head, loss and their optimizer step
        outside = {k: a[k] - low * per_layer[k] for k in ("step_ms", "fwd_bwd_ms", "optimizer_ms")}
        step48_ms = outside["step_ms"] + 48 * per_layer["step_ms"]
        error = {}
        if "steps_ms" in a and "steps_ms" in b:  # the per-layer figure's standard error: its two medians' combined
            error["per_layer_ms_standard_error"] = (
                median_standard_error(a["step_ms_spread"], len(a["steps_ms"])) ** 2
                + median_standard_error(b["step_ms_spread"], len(b["steps_ms"])) ** 2) ** 0.5 / span
        out[stack] = dict(
            whole_steps, **error, per_layer_ms=per_layer["step_ms"], fwd_bwd_per_layer_ms=per_layer["fwd_bwd_ms"],
            optimizer_per_layer_ms=per_layer["optimizer_ms"], layer_tflops=layer_tflops, layer_mfu=layer_tflops / peak,
            fwd_bwd_layer_mfu=fb_tflops / peak, tokens_per_s_48L=b["tokens"] / (step48_ms / 1e3),
            outside_layers_ms=outside["step_ms"], outside_layers_fwd_bwd_ms=outside["fwd_bwd_ms"],
            outside_layers_optimizer_ms=outside["optimizer_ms"],
            **step_breakdowns(by_depth, per_layer["fwd_bwd_ms"]))
        if a.get("trace") and b.get("trace"):
            out[stack].update(traced_busy(a, b, span))
    ours = out.get("ours", {})
    for baseline in BASELINES:
        base = out.get(baseline, {})
        if span == 0 and ours and base:
            out[f"ratios_{baseline}"] = {"tokens_per_s": ours["tokens_per_s"] / base["tokens_per_s"],
                                         "note": "our tokens/s / the baseline's: above 1 means we are faster"}
        elif "per_layer_ms" in ours and "per_layer_ms" in base:
            out[f"ratios_{baseline}"] = {k: base[k] / ours[k] for k in ("per_layer_ms", "fwd_bwd_per_layer_ms",
                                                                          "optimizer_per_layer_ms")}
            out[f"ratios_{baseline}"]["note"] = "baseline time / our time: above 1 means we are faster"
    return out


def step_breakdowns(by_depth: dict[int, dict], fwd_bwd_per_layer_ms: float | None = None) -> dict:
    """{"step_breakdown": {"<depth>L": step_breakdown(...)}} for each depth's result; empty for results measured
    before the LM head + loss had its own time."""
    if not all("head_loss_ms" in r for r in by_depth.values()):
        return {}
    return {"step_breakdown": {f"{d}L": step_breakdown(r, None if fwd_bwd_per_layer_ms is None
                                                       else d * fwd_bwd_per_layer_ms)
                               for d, r in sorted(by_depth.items())}}


def step_breakdown(result: dict, layers_fwd_bwd_ms: float | None) -> dict:
    """One depth's step: forward+backward, of which the LM head + loss, and the optimizer (ms), and the fractions of
    the step they take. Given the decoder layers' forward+backward (depth x per layer), the rest of forward+backward
    (embedding, final norm, what the engine does around the backward) apart from them; else the two together."""
    step, fwd_bwd, head_loss = result["step_ms"], result["fwd_bwd_ms"], result["head_loss_ms"]
    out = dict(step_ms=step, fwd_bwd_ms=fwd_bwd, head_loss_ms=head_loss, optimizer_ms=result["optimizer_ms"],
               head_loss_share=head_loss / step, optimizer_share=result["optimizer_ms"] / step)
    if layers_fwd_bwd_ms is None:
        out["layers_and_rest_share"] = (fwd_bwd - head_loss) / step
    else:
        out.update(layers_share=layers_fwd_bwd_ms / step, rest_share=(fwd_bwd - head_loss - layers_fwd_bwd_ms) / step)
    return out


def traced_busy(low: dict, high: dict, span: int) -> dict:
    """From the traced steps of two depths: the GPU's busy time per layer (the median busy forward+backward's
    difference) and, at each depth, how long the untraced forward+backward median waited beyond the busy time."""
    busy = {r["depth"]: statistics.median(s["busy_ms"] for s in r["trace"]["steps"]) for r in (low, high)}
    return dict(busy_per_layer_ms=(busy[high["depth"]] - busy[low["depth"]]) / span,
                **{f"waiting_ms_{r['depth']}L": r["fwd_bwd_ms"] - busy[r["depth"]] for r in (low, high)})


def kernel_tables(results: list[dict], depths: tuple[int, int]) -> dict[str, list[dict]]:
    low, high = depths
    tables = {}
    for stack in STACKS:
        by_depth = {r["depth"]: r["kernels"] for r in results if r["stack"] == stack}
        if low in by_depth and high in by_depth:
            tables[stack] = per_layer_table(by_depth[low], by_depth[high], high - low)
    return tables


def table(summary: dict) -> str:
    """The per-layer table (with one depth, or none above the noise, whole steps), then each step's split."""
    split = breakdown_table(summary)
    if not any("per_layer_ms" in v or v.get("per_layer_within_noise") for v in summary.values() if isinstance(v, dict)
               and "attention" in v):
        return "\n\n".join(filter(None, (whole_step_table(summary), split)))
    rows, notes = [], []
    for stack in ALL_STACKS:
        if stack in summary and summary[stack].get("per_layer_within_noise"):
            s = summary[stack]
            rows.append((stack, s["attention"], *["n/a"] * 5, f"{s['peak_mem_gib']:.1f}", f"{s['tokens_per_s']:.0f}",
                         "n/a"))
            notes.append(f"{stack}: the deeper model's median step differs from the shallower one's by less than "
                         f"steps vary; per-layer figures omitted, compare whole steps (tokens/s)")
        elif stack in summary:
            s = summary[stack]
            rows.append((stack, s["attention"], per_layer_cell(s, digits=1), f"{s['fwd_bwd_per_layer_ms']:.1f}",
                         f"{s['optimizer_per_layer_ms']:.1f}", f"{s['layer_tflops']:.0f}",
                         f"{100 * s['layer_mfu']:.1f}%", f"{s['peak_mem_gib']:.1f}", f"{s['tokens_per_s']:.0f}",
                         f"{s['tokens_per_s_48L']:.0f}"))
    lines = [markdown_table(("stack", "attention", "per layer ms (± standard error)", "fwd+bwd/layer ms",
                             "optimizer/layer ms", "layer TFLOP/s", "layer MFU", "peak mem GiB", "tokens/s",
                             "48-layer tokens/s"), rows)]
    for stack in ALL_STACKS:
        if "busy_per_layer_ms" in summary.get(stack, {}):
            s = summary[stack]
            waits = " / ".join(f"{v:.1f}" for k, v in s.items() if k.startswith("waiting_ms_"))
            notes.append(f"{stack}, traced: the GPU busy {s['busy_per_layer_ms']:.1f} ms a layer of forward+backward; "
                         f"the untraced forward+backward waits {waits} ms a step beyond the busy time (shallow / deep)")
    for stack in ALL_STACKS:
        if "outside_layers_ms" in summary.get(stack, {}):
            s = summary[stack]
            depth, step_ms = [(k[len("step_ms_"):-1], v) for k, v in s.items() if k.startswith("step_ms_")][-1]
            notes.append(f"{stack}: outside the layers {s['outside_layers_ms']:.1f} ms a step (forward+backward "
                         f"{s['outside_layers_fwd_bwd_ms']:.1f}, optimizer {s['outside_layers_optimizer_ms']:.1f}: "
                         f"embedding, final norm, LM head, loss), {100 * s['outside_layers_ms'] / step_ms:.0f}% of "
                         f"the {depth}-layer step")
    for baseline in BASELINES:
        if f"ratios_{baseline}" in summary:
            r = summary[f"ratios_{baseline}"]
            lines.append(f"\n{baseline}/ours: per layer {r['per_layer_ms']:.2f}x, forward+backward "
                         f"{r['fwd_bwd_per_layer_ms']:.2f}x, optimizer {r['optimizer_per_layer_ms']:.2f}x")
    return "\n\n".join(filter(None, ("\n".join(lines + notes), split)))


def breakdown_table(summary: dict) -> str:
    """Per stack and depth: the step, its forward+backward, the LM head + loss within it and the optimizer (ms),
    and the shares of the step that the decoder layers, the head + loss, the optimizer and the rest take."""
    rows, notes = [], []
    for stack in ALL_STACKS:
        for depth, b in summary.get(stack, {}).get("step_breakdown", {}).items():
            if "layers_share" in b:
                layers, rest = f"{100 * b['layers_share']:.0f}%", f"{100 * b['rest_share']:.0f}%"
            else:
                layers = rest = "n/a"
                notes.append(f"{stack} at {depth}: the decoder layers and the rest together "
                             f"{100 * b['layers_and_rest_share']:.0f}% (two depths, --layers 2,4, split them)")
            rows.append((stack, depth, f"{b['step_ms']:.1f}", f"{b['fwd_bwd_ms']:.1f}", f"{b['head_loss_ms']:.1f}",
                         f"{b['optimizer_ms']:.1f}", layers, f"{100 * b['head_loss_share']:.0f}%",
                         f"{100 * b['optimizer_share']:.0f}%", rest))
    if not rows:
        return ""
    header = ("stack", "depth", "step ms", "fwd+bwd ms", "head+loss ms", "optimizer ms", "layers %", "head+loss %",
              "optimizer %", "rest %")
    return "\n".join(["step split (head+loss: LM head and loss, forward and backward, within fwd+bwd; rest: "
                      "embedding, final norm, ...)", markdown_table(header, rows), *notes])


def whole_step_table(summary: dict) -> str:
    """One depth: whole steps only."""
    rows = []
    for stack in ALL_STACKS:
        if stack in summary:
            s = summary[stack]
            step_ms = [v for k, v in s.items() if k.startswith("step_ms_")][-1]
            rows.append((stack, s["attention"], f"{step_ms:.1f}", f"{s['tokens_per_s']:.0f}",
                         f"{100 * s['step_mfu']:.1f}%", f"{s['peak_mem_gib']:.1f}"))
    lines = [markdown_table(("stack", "attention", "step ms", "tokens/s", "MFU", "peak mem GiB"), rows)]
    for baseline in BASELINES:
        if "tokens_per_s" in summary.get(f"ratios_{baseline}", {}):
            lines.append(f"\nours/{baseline} tokens/s: {summary[f'ratios_{baseline}']['tokens_per_s']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.bench", __doc__)
    parser.add_argument("--layers", default="2,4", help="two depths, comma separated (per-layer figures), or one")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--lengths", choices=("full", "whole", *LOG_NORMAL), default="mixed",
                        help="documents of 4096 tokens, one of --tokens tokens (long documents), chat-like (median "
                        "~1.5k) or a long tail of short rows")
    parser.add_argument("--full-length", action="store_true", help="the same as --lengths full")
    parser.add_argument("--lora", action="store_true", help="LoRA (rank 16, attention + experts): ours against "
                        "transformers + PEFT (stacks ours,hf_peft_lora)")
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false",
                        help="with --lora: keep every layer's activations (both stacks)")
    parser.add_argument("--checkpoint-layers", default="all",
                        help="with activation checkpointing: how many decoder layers recompute, all, N (the first "
                        "N) or auto (ours: as train.py chooses from the memory estimate; transformers: all)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps; per-layer figures are differences of medians, so more is steadier")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat every stack and depth this many times, interleaved, and set the runs side by side")
    parser.add_argument("--stacks", help=f"comma list; default {','.join(STACKS)}, with --lora {','.join(LORA_STACKS)}")
    parser.add_argument("--attn", default="auto")
    parser.add_argument("--model", default=QWEN3_30B_A3B, help="config directory of the full-size model")
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ds-config", default=DEFAULT_DS_CONFIG, help="DeepSpeed config of our stack")
    parser.add_argument("--zero-stage", type=int, default=2, help="ZeRO stage of our stack")
    parser.add_argument("--loss-impl", default="auto", help="loss of our stack: auto, torch, chunked, liger or cce")
    parser.add_argument("--fused-kernels", default="auto", help="fused RMSNorm/RoPE of our stack: auto, liger, none")
    parser.add_argument("--gate-up-recompute", action="store_true",
                        help="our stack rebuilds the gate/up concat in backward")
    parser.add_argument("--adam-states", default="bf16", choices=("bf16", "fp32"), help="Adam moments of our stack")
    parser.add_argument("--master-weights", default="fp32", choices=("fp32", "bf16"),
                        help="master weights of our stack (bf16: the weights themselves, rounded stochastically)")
    parser.add_argument("--expert-kernels", default="auto", choices=("auto", "torch", "quack"),
                        help="experts of our stack")
    parser.add_argument("--fast-path-skip", default=None, help="our stack's --fast-path-skip (patches left out; "
                        "default: the trainer's)")
    parser.add_argument("--router-aux-loss-coef", type=float, default=None,
                        help="load-balancing loss of our stacks (default the model config's; 0: off, load counts only)")
    parser.add_argument("--router-z-loss-coef", type=float, default=0.0, help="router z-loss of our stacks")
    parser.add_argument("--profile", action="store_true", help="profile one step per worker; print and save per-layer kernel tables")
    parser.add_argument("--trace-steps", type=int, default=0,
                        help="after the timed steps, profile this many more: each forward+backward's wall, busy and "
                             "kernel time, and where the slowest differs from the fastest")
    parser.add_argument("--no-gc", action="store_true",
                        help="Python's garbage collector off for the timed steps (after one full collection)")
    parser.add_argument("--trace-export", action="store_true",
                        help="with --trace-steps: write each worker's trace beside --out (OUT_STACK_DEPTHL.trace.json.gz)")
    parser.add_argument("--host-profile", type=int, default=0,
                        help="after the timed steps, run this many more under cProfile: the Python functions that "
                             "take the host's time, by their own time and by their callees'")
    parser.add_argument("--memory-history", action="store_true",
                        help="record every allocation (torch.cuda.memory._record_memory_history) and report, per CUDA "
                             "stream, the call sites that made the allocator take new device memory (pool_growth in "
                             "--out); the recording slows the steps, so their times are not comparable")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--scratch", default="outputs/bench")
    parser.add_argument("--worker", nargs=2, metavar=("STACK", "DEPTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = "full" if args.full_length else args.lengths
    args.stacks = args.stacks or ",".join(LORA_STACKS if args.lora else STACKS)
    require_cuda("the benchmark")
    if args.worker:
        args.stack, args.depth = args.worker[0], int(args.worker[1])
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if args.runs < 1:
        raise SystemExit(f"--runs {args.runs}: at least 1")
    if args.lora and args.master_weights == "bf16":
        raise SystemExit("--master-weights bf16 is for full fine-tuning: drop it or --lora")
    depths = tuple(int(d) for d in args.layers.split(","))
    results, failures = [], []
    for run, stack, depth in ((r, s, d) for r in range(args.runs) for s in args.stacks.split(",") for d in depths):
        cmd = [sys.executable, "-m", "qwen_moe_ft.bench", "--worker", stack, str(depth),
               *[a for a in (argv if argv is not None else sys.argv[1:])]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        name = f"{stack} at {depth} layers" + (f", run {run + 1}" if args.runs > 1 else "")
        if proc.returncode or not found:  # e.g. out of memory: reported, and the other stacks still run
            print(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", file=sys.stderr)
            lines = proc.stderr.strip().splitlines() or ["?"]
            errors = [line for line in lines if "Error" in line]  # the exception, not the teardown noise after it
            failures.append(dict(stack=stack, depth=depth, run=run, error=(errors or lines)[-1]))
            continue
        results.append(dict(json.loads(found[-1][len("RESULT "):]), run=run))
        print(f"{name}: step {results[-1]['step_ms']:.1f} ms (LM head + loss {results[-1]['head_loss_ms']:.1f}), "
              f"peak {results[-1]['peak_mem_gib']:.2f} GiB allocated, {results[-1]['peak_reserved_gib']:.2f} reserved "
              f"({results[-1]['reserved_by_stream']}), losses {results[-1]['losses'][:3]}", flush=True)
        for stream, sites in (results[-1].get("pool_growth") or {}).items():
            print(f"  new device memory on the {stream} stream, by site (GiB, segments): {sites}", flush=True)
    # a run's stacks that ran at every depth
    complete = [[r for r in results if r["run"] == run
                 and {x["depth"] for x in results if x["run"] == run and x["stack"] == r["stack"]} == set(depths)]
                for run in range(args.runs)]
    kept = [run for run in complete if run]  # a run in which nothing ran at every depth is left out
    numbers = [k + 1 for k, run in enumerate(complete) if run]
    if not kept:
        print("error: no stack ran at every depth" + (" in any run" if args.runs > 1 else ""), file=sys.stderr)
        return 1
    peak = args.peak_tflops or peak_tflops(kept[0][0]["gpu"]) or 989.0
    per_run = [summarise(run, depths, peak, frozen_weights=args.lora) for run in kept]
    summary = per_run[0]
    runs = {"runs": per_run, "run_numbers": numbers} if args.runs > 1 else {}
    report = dict(tokens=args.tokens, lengths=args.lengths, lora=args.lora, depths=depths, peak_tflops=peak,
                  results=results, failures=failures, summary=summary, **runs)
    if args.profile and len(depths) == 2:
        report["per_layer_kernels"] = kernel_tables(kept[0], depths)
        for stack, rows in report["per_layer_kernels"].items():
            print(f"\n{stack}, kernels per layer ({depths[1]} minus {depths[0]} layers)\n{format_per_layer(rows)}")
    for r in results:
        if r.get("trace"):
            print(f"\n{r['stack']} at {r['depth']} layers, traced forward+backward steps (ms): "
                  f"{json.dumps(r['trace']['steps'])}\nslowest against fastest: "
                  f"{json.dumps(r['trace']['slowest_against_fastest'])}")
        for order, text in (r.get("host_profile") or {}).items():
            print(f"\n{r['stack']} at {r['depth']} layers, host time by {order} (cProfile)\n{text}")
    write_report(args.out, **report)
    print(table(summary))
    if args.runs > 1:
        print("\n" + runs_table(per_run, ALL_STACKS, BASELINES, numbers))
    for failure in failures:
        run = f", run {failure['run'] + 1}" if args.runs > 1 else ""
        print(f"{failure['stack']} at {failure['depth']} layers{run} failed: {failure['error']}")
    return 0

