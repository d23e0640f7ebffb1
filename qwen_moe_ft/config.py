"""The one config dataclass: every option of a run, fed by YAML recipes and the command line."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = str(REPO_ROOT / "data" / "tiny-qwen3-moe")
REAL_MODEL = "Qwen/Qwen3-30B-A3B"
QWEN3_30B_A3B = str(REPO_ROOT / "data" / "qwen3-30b-a3b-config")  # its config.json alone: random-init benchmarks
DEFAULT_DS_CONFIG = str(REPO_ROOT / "ds_configs" / "zero2_ep.json")
# --report-to: the modules Accelerate's tracker can write with, and what to install for them
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
TRACKER_PACKAGES = {"tensorboard": "'qwen-moe-ft[tensorboard]'", "wandb": "wandb"}


class ConfigError(ValueError):
    """A bad option: the message names the option and what to change."""


@dataclass
class TrainConfig:
    # model
    model: str = ""  # hub id or local dir; empty: the tiny model without GPU, Qwen3-30B-A3B with
    tokenizer: str = ""  # empty: same as model
    random_init: bool = False  # build the model from its config.json with random weights (benchmarks)
    num_hidden_layers: int = 0  # >0 cuts the model to this depth (with random_init)
    dtype: str = "bf16"  # bf16 | fp32
    attn: str = "auto"  # auto | flash_attn | torch_varlen | sdpa
    loss_impl: str = "auto"  # auto | torch | cce | liger
    fused_kernels: str = "auto"  # auto | liger | none: fused RMSNorm and RoPE (fastpath/liger.py)
    # data
    data: str = str(REPO_ROOT / "data" / "sample_sft.jsonl")
    eval_data: str = ""
    eval_split: float = 0.0
    eval_steps: int = 0
    max_seq_len: int = 4096
    train_on_prompt: bool = False
    on_bad_row: str = "error"  # error | skip
    truncation: str = "drop"  # drop | truncate
    num_proc: int = 1
    packing: bool = True
    max_tokens_per_batch: int = 4096  # micro-batch size in tokens, per GPU
    shuffle_buffer: int = 10000
    # optimisation
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: float = 1.0
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    adam_states: str = "bf16"  # bf16 | fp32: dtype of AdamW's two moments (fast path; stock DeepSpeed: fp32)
    grad_accum: int = 1
    seed: int = 42
    # parallelism
    ep_size: int = 0  # 0: largest size dividing both world size and the number of experts
    zero_stage: int = 2
    ds_config: str = DEFAULT_DS_CONFIG
    fast_path: str = "on"  # on | off: the patches of DeepSpeed/transformers internals in fastpath/; off is stock
    gate_up_recompute: bool = False  # rebuild the experts' gate+up concat in backward: less memory (fastpath/expert_mlp.py)
    # output and logging
    output_dir: str = "outputs/run"
    logging_steps: int = 1
    report_to: str = "none"  # none | tensorboard | wandb
    peak_tflops: float = 0.0  # 0: look up from the GPU name
    progress_bar: bool = True
    # checkpoints
    save_steps: int = 0
    save_total_limit: int = 2
    resume: str = ""  # "" | latest | path to a checkpoint directory
    export_hf: bool = True  # full fine-tuning: OUTPUT_DIR/hf/ at the end
    # LoRA (base weights frozen; OUTPUT_DIR/adapter/ in PEFT's format)
    lora: bool = False
    lora_targets: str = "attn,experts"  # comma list of attn, experts
    lora_rank: int = 8
    lora_alpha: float = 16.0
    merge: bool = False  # with --lora: also write OUTPUT_DIR/hf/ with the adapter merged in

    def validate(self) -> "TrainConfig":
        def bad(option: str, why: str) -> ConfigError:
            return ConfigError(f"--{option.replace('_', '-')}: {why}")

        choices = {"dtype": ("bf16", "fp32"), "attn": ("auto", "flash_attn", "torch_varlen", "sdpa"),
                   "loss_impl": ("auto", "torch", "cce", "liger"), "fused_kernels": ("auto", "liger", "none"),
                   "on_bad_row": ("error", "skip"), "truncation": ("drop", "truncate"),
                   "lr_schedule": ("cosine", "constant"), "adam_states": ("bf16", "fp32"), "fast_path": ("on", "off"), "report_to": ("none", "tensorboard", "wandb")}
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                raise bad(option, f"got {getattr(self, option)!r}, choose one of {', '.join(allowed)}")
        positive = ("max_seq_len", "max_tokens_per_batch", "grad_accum", "logging_steps", "num_proc",
                    "shuffle_buffer", "lora_rank")
        for option in positive:
            if getattr(self, option) < 1:
                raise bad(option, f"must be at least 1, got {getattr(self, option)}")
        non_negative = ("max_steps", "warmup_steps", "ep_size", "eval_steps", "save_steps", "save_total_limit",
                        "weight_decay", "grad_clip", "peak_tflops", "num_hidden_layers")
        for option in non_negative:
            if getattr(self, option) < 0:
                raise bad(option, f"must not be negative, got {getattr(self, option)}")
        if self.lr < 0:
            raise bad("lr", f"must not be negative, got {self.lr}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise bad("epochs", "must be positive when --max-steps is 0; set one of them")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", f"must be within [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.eval_split < 1.0:
            raise bad("eval_split", f"is a fraction of the training data in [0, 1), got {self.eval_split}")
        if self.eval_split and self.eval_data:
            raise bad("eval_split", "give either --eval-split or --eval-data, not both")
        if self.max_tokens_per_batch < self.max_seq_len and self.packing:
            raise bad("max_tokens_per_batch", f"{self.max_tokens_per_batch} cannot hold one example of "
                      f"--max-seq-len {self.max_seq_len}; raise it or lower --max-seq-len")
        if self.zero_stage not in (1, 2):
            raise bad("zero_stage", f"AutoEP training here uses ZeRO stage 1 or 2, got {self.zero_stage}")
        targets = self.lora_target_list()
        if set(targets) - {"attn", "experts"} or not targets:
            raise bad("lora_targets", f"got {self.lora_targets!r}; use a comma list of attn, experts")
        if self.lora and "experts" not in targets:
            raise bad("lora_targets", "must include experts: DeepSpeed's expert-parallel optimizer needs trainable "
                      "expert parameters (use attn,experts)")
        if self.merge and not self.lora:
            raise bad("merge", "merges a LoRA adapter into the model; add --lora true or drop --merge")
        if self.lora and (self.save_steps or self.resume):
            raise bad("save_steps" if self.save_steps else "resume",
                      "checkpoints of LoRA runs are not supported yet (DeepSpeed's AutoEP checkpoint code expects "
                      "plain expert weights); a LoRA run writes its adapter at the end and when stopped")
        if self.fast_path == "off" and self.fused_kernels == "liger":
            raise bad("fused_kernels", "liger's kernels are part of the fast path; drop --fused-kernels liger or "
                      "use --fast-path on")
        if self.num_hidden_layers and not self.random_init:
            raise bad("num_hidden_layers", "cuts a model built from its config; add --random-init")
        if self.report_to != "none" and not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[self.report_to]):
            raise bad("report_to", f"{self.report_to} is not installed (Accelerate would silently log nothing); "
                      f"pip install {TRACKER_PACKAGES[self.report_to]}, or use --report-to none")
        if not Path(self.ds_config).is_file():
            raise bad("ds_config", f"{self.ds_config} does not exist; point it at a file in ds_configs/")
        return self

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def resolved_model(self, has_gpu: bool) -> str:
        return self.model or (REAL_MODEL if has_gpu else TINY_MODEL)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _option_types() -> dict[str, type]:
    hints = get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name.replace('_', '-')}: expected true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name.replace('_', '-')}: expected {kind.__name__}, got {value!r}") from None


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML recipe given by --config, then --key value options, in that order."""
    types = _option_types()
    parser = argparse.ArgumentParser(prog="qwen_moe_ft.train", description="Fine-tune a Qwen3-MoE model.")
    parser.add_argument("--config", help="YAML recipe; command-line options override it")
    for name, kind in types.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, nargs="?", const="true", default=None, metavar="BOOL")
        else:
            parser.add_argument(flag, default=None, metavar=kind.__name__.upper())
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config: {path} does not exist")
        recipe = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(recipe) - set(types))
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; see `python -m qwen_moe_ft.train -h`")
        values.update(recipe)
    values.update({k: v for k, v in vars(args).items() if k in types and v is not None})
    return TrainConfig(**{k: _coerce(k, v, types[k]) for k, v in values.items()})

