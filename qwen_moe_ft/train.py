"""Fine-tune Qwen3-MoE: `accelerate launch qwen_moe_ft/train.py [--config recipe.yaml] [--key value ...]`.

The recipe: parse the config, build (tokenizer, data, model, DeepSpeed ZeRO-2 + AutoEP engine),
then a plain step loop that logs one line of metrics per step.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch qwen_moe_ft/train.py`
    # the repository root, in place of this folder (whose module names would shadow top-level packages)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]
    __package__ = "qwen_moe_ft"

if __name__ == "__main__":  # -h and a bad option answer before torch and DeepSpeed are imported (seconds)
    from qwen_moe_ft.cli import main as _preflight

    if _preflight(sys.argv[1:]) != 0:
        sys.exit(2)

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (DeepSpeedPlugin, DummyOptim, DummyScheduler, InitProcessGroupKwargs, gather_object,
                               set_seed)

from qwen_moe_ft import checkpoint
from qwen_moe_ft.checkpoint import CheckpointError
from qwen_moe_ft.cli import report
from qwen_moe_ft.config import ConfigError, TrainConfig, load_config
from qwen_moe_ft.data.loader import StepLoader
from qwen_moe_ft.data.packing import MicroBatch, packing_efficiency
from qwen_moe_ft.data.rows import DataError, TokenizedData, load_tokenized
from qwen_moe_ft.fastpath import FastPath, overlap_asked
from qwen_moe_ft.flops import peak_tflops
from qwen_moe_ft.loss import backward_scale, select_loss_impl, token_loss_sum
from qwen_moe_ft.lr_schedule import lr_lambda
from qwen_moe_ft.metrics import MetricsLogger, StepTimer, drop_metrics_after, step_metrics
from qwen_moe_ft.model.attention import register_varlen_attention, select_backend
from qwen_moe_ft.model.checkpointing import enable_activation_checkpointing
from qwen_moe_ft.model.export import save_hf_checkpoint
from qwen_moe_ft.model.loading import DTYPES, ModelLoadError, load_model, load_model_config, load_tokenizer
from qwen_moe_ft.model.lora import apply_lora, merge_lora, save_adapter
from qwen_moe_ft.output_dir import check_output_dir, clear_earlier_run
from qwen_moe_ft.parallel.ds_config import build_ds_config
from qwen_moe_ft.parallel.process import ensure_process_env, silence_known_warnings, without_harmless_lines
from qwen_moe_ft.parallel.sequence_parallel import enable_ulysses
from qwen_moe_ft.parallel.sizes import check_sp_size, choose_ep_size
from qwen_moe_ft.router import RouterTerms, freeze_router, resolve_aux_coef
from qwen_moe_ft.memory import Workload, plan_run, preflight_warning


def _global_sum(values: list[float] | torch.Tensor, device) -> list[float]:
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class Trainer:
    """Builds a run in the order a reader expects (runtime, loss, output, data, model, engine, logging), each
    step from its config sections, then runs its steps."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        check_output_dir(cfg.output.dir, resume=cfg.checkpoint.resume, overwrite=cfg.output.overwrite)
        self._setup_runtime()
        self._setup_loss()
        self._setup_output()
        self._setup_data()
        self._setup_engine(self._setup_model())
        self._setup_logging()

    def _setup_runtime(self):
        """Process group and Accelerator, with the DeepSpeed config this run needs (EP size from the model's
        expert count); the seed."""
        cfg = self.cfg
        has_gpu = torch.cuda.is_available()
        self.model_name = cfg.model.resolved(has_gpu)
        ensure_process_env()
        silence_known_warnings(int(os.environ["RANK"]))
        world_size = int(os.environ["WORLD_SIZE"])
        self.model_config = load_model_config(cfg.model, self.model_name)
        self.ep_size = choose_ep_size(cfg.parallel.ep_size, world_size, self.model_config.num_experts)
        self.sp_size = cfg.parallel.sp_size
        check_sp_size(self.sp_size, world_size, self.model_config)
        self.ds_config = build_ds_config(self.ep_size, world_size, "cuda" if has_gpu else "cpu",
                                         parallel=cfg.parallel, optim=cfg.optim, dtype=cfg.model.dtype)
        # The model arrives in AutoEP's layout (model/rank_local.py): the engine only builds the EP groups.
        engine_config = {**self.ds_config, "expert_parallel": {**self.ds_config["expert_parallel"], "enabled": False}}
        with without_harmless_lines():
            self.accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=engine_config),
                                           gradient_accumulation_steps=cfg.optim.grad_accum,
                                           log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
                                           project_dir=cfg.output.dir,
                                           # Without a GPU, Accelerate would not start a process group at all.
                                           kwargs_handlers=[] if has_gpu else [InitProcessGroupKwargs(backend="gloo")])
        acc = self.accelerator
        self.world_size, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        set_seed(cfg.optim.seed)

    def _setup_loss(self):
        """--loss-impl and --checkpoint-layers (auto: as the memory estimate chooses for this GPU), and a warning
        where the estimated peak exceeds the GPU, before minutes of loading end in an out-of-memory error."""
        cfg, on_gpu = self.cfg, self.device.type == "cuda"
        layers = self.model_config.num_hidden_layers
        if on_gpu:
            gpu_gib = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            run = dict(gpus=self.world_size, ep_size=self.ep_size, gpu_gib=gpu_gib)
            work = Workload.of(model=cfg.model, data=cfg.data, optim=cfg.optim, fastpath=cfg.fastpath, lora=cfg.lora,
                               layers=layers)
            plan = plan_run(work, self.model_config, **run)
            self.loss_impl, self.loss_choice = select_loss_impl(plan.loss, "cuda", tokens=cfg.data.max_tokens_per_batch)
            self.loss_choice = self.loss_choice or plan.loss_why
            self.recomputed_layers = plan.recomputed_layers
            if self.accelerator.is_main_process and (warning := preflight_warning(work, self.model_config, **run)):
                print(f"warning: {warning}", flush=True)
        else:  # no GPU memory to fit: auto recomputes every layer asked for
            self.loss_impl, self.loss_choice = select_loss_impl(cfg.model.loss_impl, self.device.type,
                                                                tokens=cfg.data.max_tokens_per_batch)
            fixed = cfg.model.recomputed_layers(layers)
            self.recomputed_layers = layers if fixed is None else fixed

    def _setup_output(self):
        """The checkpoint to resume from, checked against this run's layout before any weight is loaded, and an
        earlier run's outputs removed where --overwrite-output-dir asks."""
        cfg, acc = self.cfg, self.accelerator
        self.checkpoint_root = Path(cfg.output.dir) / "checkpoints"
        self.layout = checkpoint.Layout(self.world_size, self.ep_size, cfg.lora.enabled, self.sp_size)
        self.resume_path = None
        if cfg.checkpoint.resume:  # before any weight is loaded: a checkpoint this layout cannot resume stops here
            self.resume_path = checkpoint.resolve(cfg.checkpoint.resume, self.checkpoint_root)
            checkpoint.check_layout(self.resume_path, self.layout)
        if cfg.output.overwrite:
            if acc.is_main_process and (removed := clear_earlier_run(Path(cfg.output.dir))):
                print(f"--overwrite-output-dir: removed the earlier run's {', '.join(removed)} from {cfg.output.dir}")
            acc.wait_for_everyone()

    def _setup_data(self):
        """The tokenised rows, and the loaders that plan each step's micro-batches on this rank."""
        cfg, data = self.cfg, self.cfg.data
        self.tokenizer = load_tokenizer(cfg.model, self.model_name)
        self.data = self._load_data()
        # --max-tokens-per-batch is per GPU: a row split over an SP group holds that many tokens a rank
        self.row_capacity = data.max_tokens_per_batch * self.sp_size
        loader_args = dict(capacity=self.row_capacity, packing=data.packing, seed=cfg.optim.seed,
                           shuffle_buffer=data.shuffle_buffer, world_size=self.world_size, rank=self.rank,
                           grad_accum=cfg.optim.grad_accum, pad_id=self.tokenizer.pad_token_id, sp_size=self.sp_size)
        self.train_loader = StepLoader(self.data.train, **loader_args)
        self.eval_loader = StepLoader(self.data.eval, **{**loader_args, "grad_accum": 1}) if self.data.eval else None
        self.data_order = checkpoint.DataOrder.of(cfg.flat(), self.train_loader.lengths)
        if self.resume_path:  # before the model: a resume whose steps would train other examples stops here
            note = checkpoint.check_data_order(self.resume_path, self.data_order, self.layout)
            if note and self.accelerator.is_main_process:
                print(f"note: {note}", flush=True)
        self.total_steps = cfg.optim.max_steps or self.train_loader.total_steps(cfg.optim.epochs)
        self.schedule = checkpoint.Schedule.of(cfg.flat(), self.total_steps)
        if self.resume_path:
            checkpoint.check_schedule(self.resume_path, self.schedule)

    def _load_data(self) -> TokenizedData:
        """Rank 0 tokenises first, the others then read its cache. A DataError on any rank stops every rank with
        that message: a rank stopping alone would leave its peers to fail on a closed connection."""
        data, error = None, None
        for main_turn in (True, False):
            if self.accelerator.is_main_process == main_turn:
                try:
                    data = load_tokenized(self.cfg.data, self.tokenizer, seed=self.cfg.optim.seed)
                except DataError as err:
                    error = str(err)
            if errors := [e for e in gather_object([error]) if e]:
                raise DataError(errors[0])
        return data

    def _setup_model(self) -> torch.nn.Module:
        """The model with packed attention, the fast path's kernels swapped in, and LoRA if asked."""
        cfg = self.cfg
        if cfg.data.packing:
            self.attn_backend = select_backend(cfg.model.attn, self.device.type)
            attn_implementation = register_varlen_attention(self.attn_backend)
        else:
            self.attn_backend, attn_implementation = "sdpa", "sdpa"
        # off: does nothing, imports no patch module
        self.fast_path = FastPath(enabled=cfg.fastpath.mode == "on", skip=cfg.fastpath.skip)
        if overlap_asked(cfg.fastpath, cfg.lora):  # the step's stream before the model is allocated
            self.fast_path.enter_step_stream(self.device)
        model = load_model(cfg.model, self.model_name, self.model_config, attn_implementation, self.ds_config,
                           self.rank)
        if self.sp_size > 1:  # before the engine, which reads the SP groups
            enable_ulysses(model, attn_implementation, self.sp_size)
        if cfg.router.freeze:  # before the engine: AutoEP's router copies the flag, DeepSpeed skips the weight
            freeze_router(model)
        model, self.fused_kernels = self.fast_path.prepare_model(model, cfg.fastpath.fused_kernels, self.device.type)
        self.recompute = "activations kept"
        if self.recomputed_layers:
            try:
                self.recompute = enable_activation_checkpointing(model, self.recomputed_layers)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if cfg.model.checkpoint_layers == "auto":
                self.recompute += (" (auto: the fewest the memory estimate fits)" if self.device.type == "cuda" else
                                   " (auto: all, with no GPU memory to fit)")
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora, self.ds_config, self.rank, seed=cfg.optim.seed)
        return model

    def _setup_engine(self, model: torch.nn.Module):
        """DeepSpeed ZeRO-2 (+ AutoEP) through Accelerate, with our AdamW settings and LR schedule, the router's
        loss terms, then the fast path's replacements of DeepSpeed's ZeRO-2 step and AutoEP's MoE blocks: from
        there on engine.step() is the fast path's step where `one_pass_adamw` is listed at startup."""
        cfg, optim = self.cfg, self.cfg.optim
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = DummyOptim(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
        scheduler = DummyScheduler(optimizer, lr_scheduler_callable=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(optim.lr_schedule, optim.warmup_steps, self.total_steps, optim.min_lr_ratio)))
        self.engine, _, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.router = RouterTerms(self.engine.module,
                                  aux_coef=resolve_aux_coef(cfg.router.aux_loss_coef, self.model_config),
                                  form=cfg.router.aux_loss_form, scope=cfg.router.aux_scope,
                                  z_coef=cfg.router.z_loss_coef)
        self.fast_path.install(self.engine, adam_states=cfg.fastpath.adam_states,
                               gate_up_recompute=cfg.fastpath.gate_up_recompute,
                               expert_kernels=cfg.fastpath.expert_kernels,
                               master_weights=cfg.fastpath.master_weights)

    def _setup_logging(self):
        """Metrics (the line, metrics.jsonl, the tracker), the peak FLOPs MFU is taken against, and the startup
        lines that say what this run is."""
        cfg, acc = self.cfg, self.accelerator
        on_gpu = self.device.type == "cuda"
        self.peak = cfg.output.peak_tflops or (peak_tflops(torch.cuda.get_device_name(self.device)) if on_gpu else None)
        self.stop_signal: str | None = None
        self.metrics = MetricsLogger(cfg.output.dir, self.total_steps, acc, enabled=acc.is_main_process,
                                     progress_bar=cfg.output.progress_bar)
        if cfg.output.report_to != "none":
            acc.init_trackers("qwen_moe_ft", config=cfg.flat())
        plan, lengths = self.train_loader.plan(1), self.train_loader.lengths
        epoch_steps = self.train_loader.epoch_steps(self.total_steps)
        fewest, most = min(epoch_steps), max(epoch_steps)
        loss = f"{self.loss_impl} ({self.loss_choice})" if self.loss_choice else self.loss_impl
        self.metrics.info(
            f"model {self.model_name} | {self.world_size} process(es) on {self.device.type} | ep_size {self.ep_size} | "
            f"{f'sp_size {self.sp_size} (Ulysses) | ' if self.sp_size > 1 else ''}"
            f"zero {cfg.parallel.zero_stage} | "
            f"{'LoRA on ' + cfg.lora.targets if cfg.lora.enabled else 'full fine-tuning'} | "
            f"{self.recompute} | "
            f"attention {self.attn_backend} | loss {loss} | fused kernels {self.fused_kernels} | "
            f"adam moments {self.fast_path.adam_states} | {len(lengths)} examples, "
            f"mean length {sum(lengths) / len(lengths):.1f} tokens | {len(plan)} micro-batches per epoch, "
            f"{'packing' if cfg.data.packing else 'padding'} efficiency "
            f"{packing_efficiency(plan, lengths, self.row_capacity):.1%} | "
            f"{fewest if fewest == most else f'{fewest}-{most}'} steps per epoch, {self.total_steps} steps")
        self.metrics.info(self.router.summary(cfg.optim.grad_accum) + (", routers frozen" if cfg.router.freeze else ""))
        if on_gpu and not self.peak:
            self.metrics.info(f"mfu n/a (unknown GPU: pass --peak-tflops, the bf16 dense TFLOP/s of "
                              f"{torch.cuda.get_device_name(self.device)})")
        self.metrics.info(self.fast_path.summary())
        if line := self.data.report(cfg.data.max_seq_len, cfg.data.truncation):
            self.metrics.info(line)

    def train_step(self, step: int):
        start = time.perf_counter()
        batches = self.train_loader.step(step)
        return self.run_step(batches.micro_batches, step=step + 1, epoch=batches.epoch,
                             data_seconds=time.perf_counter() - start)

    def run_step(self, micro_batches: list[MicroBatch], *, step: int, epoch: int, timer: StepTimer | None = None,
                 data_seconds: float = 0.0):
        """One optimizer step over this rank's micro-batches; the loss is normalised by the global label count.
        data_seconds: building the micro-batches took this long, a part of the step's time."""
        timer = timer or StepTimer(self.device)
        timer.begin()
        local = [sum(b.num_label_tokens for b in micro_batches), sum(b.num_tokens for b in micro_batches),
                 sum(b.context_sum for b in micro_batches),
                 sum(1 for b in micro_batches if b.num_tokens)]
        label_tokens, tokens, context_sum, filled = _global_sum(local, self.device)
        scale = backward_scale(int(label_tokens), len(micro_batches))
        self.router.start_step(micro_batches, real_tokens=int(tokens), nonempty_micro_batches=int(filled),
                               device=self.device)
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, micro in enumerate(micro_batches):
            micro = micro.to(self.device)
            last = i == len(micro_batches) - 1
            # What Accelerate's backward does for DeepSpeed, spelled out to time the optimizer apart.
            self.engine.set_gradient_accumulation_boundary(is_boundary=last)
            with self.router.micro_batch(micro):
                loss = token_loss_sum(self.engine, micro.inputs, micro.shift_labels, self.loss_impl)
            # The router terms are already the step's sums: only DeepSpeed's division by the accumulation undone.
            self.engine.backward(loss * scale + self.router.loss() * len(micro_batches))
            loss_sum += loss.detach()
        timer.mark("forward_backward")
        self.engine.step()
        loss_total, *router_totals = _global_sum(torch.cat([loss_sum.view(1), self.router.step_totals()]),
                                                 self.device)
        self.router_stats = self.router.read(router_totals)
        grad_norm = self.engine.get_global_grad_norm()
        seconds = timer.end()
        return step_metrics(
            step=step, epoch=epoch, loss=loss_total / max(label_tokens, 1),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), lr=lr, seconds=seconds,
            data_seconds=data_seconds, tokens=int(tokens), label_tokens=int(label_tokens),
            mean_context=context_sum / max(tokens, 1),
            world_size=self.world_size, model_config=self.model_config, peak_tflops=self.peak,
            mem_gib=timer.peak_mem_gib(), mem_reserved_gib=timer.peak_reserved_gib(),
            alloc_retries=timer.alloc_retries(), frozen_weights=self.cfg.lora.enabled,
            aux_loss=self.router_stats.aux_loss,
            z_loss=self.router_stats.z_loss, expert_load_max=self.router_stats.expert_load_max,
            dead_experts=self.router_stats.dead_experts)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Loss per label token over the held-out set, summed over all ranks."""
        self.engine.eval()
        loss_sum, label_tokens = 0.0, 0
        for micro_batches in self.eval_loader.epoch_batches():
            for micro in micro_batches:
                micro = micro.to(self.device)
                loss_sum += token_loss_sum(self.engine, micro.inputs, micro.shift_labels, self.loss_impl).item()
                label_tokens += micro.num_label_tokens
        self.engine.train()
        loss_sum, label_tokens = _global_sum([loss_sum, label_tokens], self.device)
        return loss_sum / max(label_tokens, 1), int(label_tokens)

    def _save_adapter(self):
        self.fast_path.settle()
        out = save_adapter(self.engine.module, self.cfg.lora, self.model_name,
                           os.path.join(self.cfg.output.dir, "adapter"), is_main=self.accelerator.is_main_process)
        self.metrics.info(f"saved {out} (PEFT LoRA adapter of the stock model)")

    def _stop_on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name

    def _resume(self) -> int:
        path = self.resume_path
        start, how = checkpoint.load(self.engine, path, rank=self.rank, layout=self.layout)
        self.fast_path.after_load()
        if self.accelerator.is_main_process:
            for name in ("metrics.jsonl", "expert_load.jsonl"):
                if note := drop_metrics_after(Path(self.cfg.output.dir) / name, start):
                    self.metrics.info(note)
        if how:
            self.metrics.info(how)
        self.metrics.info(f"resumed from {path} at step {start}")
        return start

    def run(self) -> int:
        cfg = self.cfg
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop_on_signal)
        start = self._resume() if self.resume_path else 0
        self.metrics.start(start)
        self.engine.train()
        for step in range(start, self.total_steps):
            metrics = self.train_step(step)
            done = step + 1
            self.metrics.log_step(metrics, log_line=done % cfg.output.logging_steps == 0 or done == self.total_steps)
            load_steps = cfg.router.expert_load_steps
            if load_steps and (done % load_steps == 0 or done == self.total_steps):
                self.metrics.log_expert_load(done, self.router_stats.load)
            eval_steps = cfg.data.eval_steps
            if self.eval_loader and ((eval_steps and done % eval_steps == 0) or done == self.total_steps):
                self.metrics.log_eval(done, *self.evaluate())
            # Every rank must agree to stop at the same step: the signal may reach them apart.
            stop = _global_sum([float(self.stop_signal is not None)], self.device)[0] > 0
            save_steps = cfg.checkpoint.save_steps
            if save_steps and (done % save_steps == 0 or done == self.total_steps) or stop:
                self.fast_path.settle()
                path = checkpoint.save(self.engine, self.checkpoint_root, done, rank=self.rank,
                                       keep=cfg.checkpoint.save_total_limit, layout=self.layout,
                                       data_order=self.data_order, schedule=self.schedule)
                self.metrics.info(f"saved checkpoint {path}")
            if stop:
                if cfg.lora.enabled:
                    self._save_adapter()
                self.metrics.info(f"stopped by {self.stop_signal or 'a signal on another rank'} after step {done}; "
                                  "continue with --resume latest")
                self._finish()
                return 0
        if cfg.lora.enabled:
            self._save_adapter()
        if cfg.lora.merge or (cfg.checkpoint.export_hf and not cfg.lora.enabled):
            self.fast_path.settle()
            model = merge_lora(self.engine.module) if cfg.lora.merge else self.engine
            out = save_hf_checkpoint(model, self.tokenizer, os.path.join(cfg.output.dir, "hf"),
                                     is_main=self.accelerator.is_main_process, dtype=DTYPES[cfg.model.dtype])
            merged = ", LoRA merged" if cfg.lora.merge else ""
            self.metrics.info(f"saved {out} (transformers Qwen3-MoE layout, safetensors{merged})")
        self._finish()
        self.accelerator.end_training()
        return 0

    def _finish(self):
        self.metrics.close()
        self.fast_path.restore()


OUT_OF_MEMORY = ("the GPU ran out of memory (traceback above). `python -m qwen_moe_ft.memory --config RECIPE` "
                 "estimates the peak and the fewest layers to recompute; what lowers it: --activation-checkpointing "
                 "true with --checkpoint-layers N (more layers), --max-tokens-per-batch (fewer tokens a micro-batch), "
                 "--loss-impl chunked (no [tokens, vocab] logits), or more GPUs. A run with checkpoints continues with "
                 "--resume latest")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(argv)
        return Trainer(cfg).run()
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as err:
        report(err)
        return 2
    except torch.OutOfMemoryError:  # every rank that ran out says so: it need not be rank 0
        traceback.print_exc()
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
