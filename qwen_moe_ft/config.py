"""The run's config: one dataclass per section (model, data, optimisation, router, parallelism, fast path,
output, checkpoints, LoRA), each module taking its own. Every option also has a flat name (`--lr`, `lr:` in a
YAML recipe) by which the command line and recipes set it; the flat name, default, help and allowed values are
in the option's field below and nowhere else."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

PACKAGE = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE.parent  # a clone's data/; an installed package passes --model and --data by path
RECIPES = PACKAGE / "recipes"
TINY_MODEL = str(REPO_ROOT / "data" / "tiny-qwen3-moe")
REAL_MODEL = "Qwen/Qwen3-30B-A3B"
# its config.json alone, shipped with the package (data/qwen3-30b-a3b-config links to it): random-init benchmarks and
# the memory estimate
QWEN3_30B_A3B = str(PACKAGE / "model" / "qwen3-30b-a3b")
DEFAULT_DS_CONFIG = str(PACKAGE / "ds_configs" / "zero2_ep.json")  # ds_configs/zero2_ep.json is a copy users read
# --report-to: the modules Accelerate's tracker can write with, and what to install for them
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
TRACKER_PACKAGES = {"tensorboard": "'qwen-moe-ft[tensorboard]'", "wandb": "wandb"}


class ConfigError(ValueError):
    """A bad option: the message names the option and what to change."""


def flag(option: str) -> str:
    """The command-line spelling of a flat option name: max_seq_len -> --max-seq-len."""
    return "--" + option.replace("_", "-")


def _opt(default: Any, help: str, *, flat: str = "", choices: tuple[str, ...] = ()) -> Any:
    """An option: `flat` its command-line and recipe name where that is not the field's (`--lora` is lora.enabled),
    `choices` its allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "flat": flat, "choices": choices})


@dataclass
class ModelConfig:
    name: str = _opt("", "hub id or local dir; empty: the tiny model without GPU, Qwen3-30B-A3B with GPUs",
                     flat="model")
    tokenizer: str = _opt("", "hub id or local dir of the tokenizer; empty: the model's")
    random_init: bool = _opt(False, "build the model from its config.json with random weights (benchmarks)")
    num_hidden_layers: int = _opt(0, ">0 cuts the model to this depth (with --random-init)")
    dtype: str = _opt("bf16", "dtype of weights and compute", choices=("bf16", "fp32"))
    attn: str = _opt("auto", "attention kernel of packed rows", choices=("auto", "flash_attn", "torch_varlen", "sdpa"))
    loss_impl: str = _opt("auto", "cross-entropy: triton (GPU) or torch on the whole [tokens, vocab] logits (triton: "
                          "two kernels, the gradient written over the bf16 logits; the fastest measured), chunked "
                          "(torch, 1024 tokens' logits at a time), or liger's or cut-cross-entropy's fused kernels; "
                          "auto: triton (torch without a GPU) up to 8192 tokens a micro-batch where the logits fit the "
                          "GPU, chunked otherwise", choices=("auto", "triton", "torch", "chunked", "cce", "liger"))
    activation_checkpointing: bool = _opt(False, "recompute each decoder layer's forward in the backward: "
                                          "activations of one layer instead of all, for about a third more compute")
    checkpoint_layers: str = _opt("all", "with --activation-checkpointing, how many decoder layers recompute (the "
                                  "first N; the others keep their activations, less recompute for more memory): all, "
                                  "a number, or auto: the fewest that leave 5 GiB of this GPU free by the estimate of "
                                  "`python -m qwen_moe_ft.memory`, the loss in chunks where that keeps more layers")

    def recomputed_layers(self, layers: int) -> int | None:
        """How many of `layers` decoder layers recompute: a number, or None where --checkpoint-layers auto leaves it
        to the memory estimate."""
        if not self.activation_checkpointing:
            return 0
        if self.checkpoint_layers == "auto":
            return None
        return layers if self.checkpoint_layers in ("all", "0") else int(self.checkpoint_layers)

    def resolved(self, has_gpu: bool) -> str:
        return self.name or (REAL_MODEL if has_gpu else TINY_MODEL)


@dataclass
class DataConfig:
    source: str = _opt(str(REPO_ROOT / "data" / "sample_sft.jsonl"), "training rows: .jsonl/.json/.parquet/.csv "
                       "file, datasets.save_to_disk dir, or hub name org/name", flat="data")
    eval_data: str = _opt("", "held-out rows, same formats as --data")
    eval_split: float = _opt(0.0, "fraction of --data held out for evaluation instead of --eval-data")
    eval_steps: int = _opt(0, "evaluate every N steps (and at the end); 0: at the end only")
    max_seq_len: int = _opt(4096, "longest example in tokens; longer ones are dropped or truncated (--truncation)")
    train_on_prompt: bool = _opt(False, "learn the prompt tokens too, not only the assistant's answers")
    on_bad_row: str = _opt("error", "a malformed row stops the run (error) or is skipped and counted (skip)",
                           choices=("error", "skip"))
    truncation: str = _opt("drop", "rows over --max-seq-len: dropped and counted, or cut at a turn boundary",
                           choices=("drop", "truncate"))
    num_proc: int = _opt(1, "processes that tokenise the data")
    packing: bool = _opt(True, "pack several examples into one row (varlen attention) instead of padding")
    max_tokens_per_batch: int = _opt(4096, "micro-batch size in tokens, per GPU")
    shuffle_buffer: int = _opt(10000, "examples shuffled together when planning micro-batches")


@dataclass
class OptimConfig:
    max_steps: int = _opt(0, "optimizer steps; 0: run --epochs epochs")
    epochs: float = _opt(1.0, "passes over the data when --max-steps is 0")
    lr: float = _opt(1e-4, "peak learning rate")
    lr_schedule: str = _opt("cosine", "decay after warmup", choices=("cosine", "constant"))
    warmup_steps: int = _opt(0, "linear warmup steps")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this; 0: no clipping")
    grad_accum: int = _opt(1, "micro-batches per rank per optimizer step")
    seed: int = _opt(42, "seed of weights init, shuffling and dropout")


@dataclass
class RouterConfig:
    """router.py; its docstring has the formulas and why the global scope is exact under accumulation."""
    aux_loss_coef: float | None = _opt(None, "load-balancing loss coefficient; unset: the model config's "
                                       "router_aux_loss_coef; 0: off", flat="router_aux_loss_coef")
    aux_loss_form: str = _opt("transformers", "transformers: coef * E * sum_i f_i P_i over all layers' "
                              "routing pooled, f_i per token (summing to top_k), as transformers' "
                              "load_balancing_loss_func: coef * top_k at even routing; per_layer: f_i per "
                              "token-slot, per layer then averaged (Megatron-LM's normalisation): coef at "
                              "even routing, 1/top_k of transformers' at the same coefficient",
                              flat="router_aux_loss_form", choices=("transformers", "per_layer"))
    aux_scope: str = _opt("global", "token counts f_i of the whole step (every micro-batch and rank: the "
                          "same loss at any EP size, rank count or accumulation) or of each micro-batch",
                          flat="router_aux_scope", choices=("global", "micro_batch"))
    z_loss_coef: float = _opt(0.0, "router z-loss coef * mean(logsumexp(router logits)^2); 0: off",
                              flat="router_z_loss_coef")
    freeze: bool = _opt(False, "the routers' gate weights get no gradient and no optimizer state "
                        "(--lora freezes them anyway)", flat="freeze_router")
    expert_load_steps: int = _opt(50, "a row per layer of expert token counts in OUTPUT_DIR/expert_load.jsonl "
                                  "every N steps; 0: never")


@dataclass
class ParallelConfig:
    ep_size: int = _opt(0, "expert-parallel size; 0: largest size dividing both world size and expert count")
    zero_stage: int = _opt(2, "DeepSpeed ZeRO stage (1 or 2)")
    ds_config: str = _opt(DEFAULT_DS_CONFIG, "DeepSpeed config the run's settings are filled into")
    sp_size: int = _opt(1, "sequence-parallel size (DeepSpeed Ulysses): each packed row is split over this many "
                        "consecutive ranks, which exchange attention heads to attend over the whole row; rows hold "
                        "--max-tokens-per-batch x SP tokens, documents up to that long; 1: off")


@dataclass
class FastPathConfig:
    mode: str = _opt("on", "the patches of DeepSpeed/transformers internals in fastpath/; off is stock",
                     flat="fast_path", choices=("on", "off"))
    fused_kernels: str = _opt("auto", "fused RMSNorm and RoPE (fastpath/liger.py)", choices=("auto", "liger", "none"))
    adam_states: str = _opt("bf16", "dtype of AdamW's two moments (fast path; stock DeepSpeed: fp32)",
                            choices=("bf16", "fp32"))
    master_weights: str = _opt("fp32", "what AdamW updates: fp32 master weights (the fast path keeps them as the bf16 "
                               "weights' low 16 bits: exact), or the bf16 weights themselves, each update rounded "
                               "stochastically (unbiased, not exact; 4 fewer bytes a parameter in the step, 2 less "
                               "memory; full fine-tuning of bf16 weights on the fast path)",
                               choices=("fp32", "bf16"))
    gate_up_recompute: bool = _opt(False, "rebuild the experts' gate+up concat in backward: less memory")
    expert_kernels: str = _opt("auto", "experts at EP=1: torch._grouped_mm, or quack-kernels' grouped GEMMs with the "
                               "gather and SwiGLU fused (Hopper+, pip install 'qwen-moe-ft[flash4]'); auto: quack "
                               "where it runs", choices=("auto", "torch", "quack"))
    # triton_hidden_norms, fused_attention_inputs and quack_scored_combine pass their GPU tests but did not make the
    # step measurably faster (BENCHMARKS.md; docs/benchmark-history.md, 5a01695): left out, fewer kernels of our own
    # in the default step
    skip: str = _opt("triton_hidden_norms,fused_attention_inputs,quack_scored_combine",
                     "comma list of fast-path patches to leave out, by the names the startup line gives (those that "
                     "others do not build on: fastpath.SKIPPABLE), e.g. if one fails on your GPU; the default leaves "
                     "out three measured no faster ('' tries them)", flat="fast_path_skip")


@dataclass
class OutputConfig:
    dir: str = _opt("outputs/run", "where metrics.jsonl, checkpoints/, hf/ and adapter/ are written",
                    flat="output_dir")
    overwrite: bool = _opt(False, "remove an earlier run's metrics, checkpoints and exports first",
                           flat="overwrite_output_dir")
    logging_steps: int = _opt(1, "print and record metrics every N steps")
    report_to: str = _opt("none", "tracker that also receives the metrics", choices=("none", "tensorboard", "wandb"))
    peak_tflops: float = _opt(0.0, "peak TFLOPS per GPU for MFU; 0: look up from the GPU name")
    progress_bar: bool = _opt(True, "a progress bar when stdout is a terminal")


@dataclass
class CheckpointConfig:
    save_steps: int = _opt(0, "save a checkpoint every N steps (and at the end); 0: only when stopped by a signal")
    save_total_limit: int = _opt(2, "checkpoints kept (the newest and the one `latest` names); 0: all")
    resume: str = _opt("", "continue from `latest` or a checkpoint directory")
    export_hf: bool = _opt(True, "full fine-tuning: write OUTPUT_DIR/hf/ at the end")


@dataclass
class LoraConfig:
    enabled: bool = _opt(False, "train LoRA adapters, base weights frozen; OUTPUT_DIR/adapter/ in PEFT's format",
                         flat="lora")
    targets: str = _opt("attn,experts", "comma list of attn, experts", flat="lora_targets")
    rank: int = _opt(8, "LoRA rank", flat="lora_rank")
    alpha: float = _opt(16.0, "LoRA alpha (scale alpha/rank)", flat="lora_alpha")
    merge: bool = _opt(False, "with --lora: also write OUTPUT_DIR/hf/ with the adapter merged in")

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]


def _section(kind: type, title: str) -> Any:
    return dataclasses.field(default_factory=kind, metadata={"title": title})


@dataclass
class TrainConfig:
    # -h lists the options by section, under each section's title, in this order.
    model: ModelConfig = _section(ModelConfig, "model")
    data: DataConfig = _section(DataConfig, "data")
    optim: OptimConfig = _section(OptimConfig, "optimisation")
    router: RouterConfig = _section(RouterConfig, "MoE router")
    parallel: ParallelConfig = _section(ParallelConfig, "parallelism")
    fastpath: FastPathConfig = _section(FastPathConfig, "fast path")
    output: OutputConfig = _section(OutputConfig, "output and logging")
    checkpoint: CheckpointConfig = _section(CheckpointConfig, "checkpoints")
    lora: LoraConfig = _section(LoraConfig, "LoRA")

    @classmethod
    def from_flat(cls, **options: Any) -> "TrainConfig":
        """The config of these options by their flat names (`lr=...`, as in a recipe); the others at their
        defaults."""
        by_section: dict[str, dict[str, Any]] = {section.name: {} for section in fields(cls)}
        for name, value in options.items():
            if name not in OPTIONS:
                raise TypeError(f"TrainConfig.from_flat: unknown option {name!r}")
            section, field = OPTIONS[name]
            by_section[section][field.name] = value
        return cls(**{section.name: section.default_factory(**by_section[section.name]) for section in fields(cls)})

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name (trackers' config, validation, the data order a checkpoint records)."""
        return {name: getattr(getattr(self, section), field.name) for name, (section, field) in OPTIONS.items()}

    def validate(self) -> "TrainConfig":
        def bad(option: str, why: str) -> ConfigError:
            return ConfigError(f"{flag(option)}: {why}")

        o = self.flat()
        for option, (_, field) in OPTIONS.items():
            if (allowed := field.metadata["choices"]) and o[option] not in allowed:
                raise bad(option, f"got {o[option]!r}, choose one of {', '.join(allowed)}")
        positive = ("max_seq_len", "max_tokens_per_batch", "grad_accum", "logging_steps", "num_proc",
                    "shuffle_buffer", "lora_rank", "sp_size")
        for option in positive:
            if o[option] < 1:
                raise bad(option, f"must be at least 1, got {o[option]}")
        non_negative = ("max_steps", "warmup_steps", "ep_size", "eval_steps", "save_steps", "save_total_limit",
                        "weight_decay", "grad_clip", "peak_tflops", "num_hidden_layers", "router_z_loss_coef",
                        "expert_load_steps", "lr")
        for option in non_negative:
            if o[option] < 0:
                raise bad(option, f"must not be negative, got {o[option]}")
        if o["router_aux_loss_coef"] is not None and o["router_aux_loss_coef"] < 0:
            raise bad("router_aux_loss_coef", f"must not be negative, got {o['router_aux_loss_coef']}; 0 turns the "
                      "load-balancing loss off, leaving it out takes the model config's")
        if o["max_steps"] == 0 and o["epochs"] <= 0:
            raise bad("epochs", "must be positive when --max-steps is 0; set one of them")
        if not 0.0 <= o["min_lr_ratio"] <= 1.0:
            raise bad("min_lr_ratio", f"must be within [0, 1], got {o['min_lr_ratio']}")
        if not 0.0 <= o["eval_split"] < 1.0:
            raise bad("eval_split", f"is a fraction of the training data in [0, 1), got {o['eval_split']}")
        if o["eval_split"] and o["eval_data"]:
            raise bad("eval_split", "give either --eval-split or --eval-data, not both")
        if o["sp_size"] > 1 and not o["packing"]:
            raise bad("sp_size", "splits packed rows over ranks; add --packing true or use --sp-size 1")
        if o["sp_size"] > 1 and o["router_aux_scope"] == "micro_batch":
            raise bad("sp_size", "a micro-batch spans --sp-size ranks, whose counts the micro_batch scope does not "
                      "sum; use --router-aux-scope global (the default) or --sp-size 1")
        row = o["max_tokens_per_batch"] * o["sp_size"]
        if row < o["max_seq_len"] and o["packing"]:
            spread = f" x --sp-size {o['sp_size']} = {row}" if o["sp_size"] > 1 else ""
            raise bad("max_tokens_per_batch", f"{o['max_tokens_per_batch']}{spread} cannot hold one example of "
                      f"--max-seq-len {o['max_seq_len']}; raise it or lower --max-seq-len")
        if o["zero_stage"] not in (1, 2):
            raise bad("zero_stage", f"AutoEP training here uses ZeRO stage 1 or 2, got {o['zero_stage']}")
        targets = self.lora.target_list()
        if set(targets) - {"attn", "experts"} or not targets:
            raise bad("lora_targets", f"got {o['lora_targets']!r}; use a comma list of attn, experts")
        if o["lora"] and "experts" not in targets:
            raise bad("lora_targets", "must include experts: DeepSpeed's expert-parallel optimizer needs trainable "
                      "expert parameters (use attn,experts)")
        if o["overwrite_output_dir"] and o["resume"]:
            raise bad("overwrite_output_dir", "would remove the checkpoints --resume continues from; give one of them")
        if o["merge"] and not o["lora"]:
            raise bad("merge", "merges a LoRA adapter into the model; add --lora true or drop --merge")
        if o["fast_path"] == "off" and o["fused_kernels"] == "liger":
            raise bad("fused_kernels", "liger's kernels are part of the fast path; drop --fused-kernels liger or "
                      "use --fast-path on")
        if o["fast_path"] == "off" and o["expert_kernels"] == "quack":
            raise bad("expert_kernels", "quack's expert kernels are part of the fast path; use --fast-path on")
        if o["master_weights"] == "bf16" and (o["fast_path"] == "off" or o["lora"] or o["dtype"] != "bf16"):
            raise bad("master_weights", "bf16 masters are the fast path's, for full fine-tuning of bf16 weights; "
                      "use --master-weights fp32" + (" or --fast-path on" if o["fast_path"] == "off" else ""))
        layers = o["checkpoint_layers"]
        if layers not in ("all", "auto") and not (layers.isdigit()):
            raise bad("checkpoint_layers", f"got {layers!r}; use all, auto or a number of layers")
        if layers not in ("all", "0") and not o["activation_checkpointing"]:
            raise bad("checkpoint_layers", "chooses how many layers --activation-checkpointing recomputes; add "
                      "--activation-checkpointing true or drop it")
        if o["num_hidden_layers"] and not o["random_init"]:
            raise bad("num_hidden_layers", "cuts a model built from its config; add --random-init")
        report_to = o["report_to"]
        if report_to != "none" and not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[report_to]):
            raise bad("report_to", f"{report_to} is not installed (Accelerate would silently log nothing); "
                      f"pip install {TRACKER_PACKAGES[report_to]}, or use --report-to none")
        if not Path(o["ds_config"]).is_file():
            raise bad("ds_config", f"{o['ds_config']} does not exist; point it at a file in ds_configs/")
        return self


def _section_options(section: dataclasses.Field) -> dict[str, tuple[str, dataclasses.Field]]:
    return {field.metadata["flat"] or field.name: (section.name, field) for field in fields(section.default_factory)}


# Every option by its flat name: (its section, its field), in -h's order.
OPTIONS: dict[str, tuple[str, dataclasses.Field]] = {
    name: where for section in fields(TrainConfig) for name, where in _section_options(section).items()}


def _option_types() -> dict[str, type]:
    """Each option's type; `float | None` gives float (None: not given, decided from the model)."""
    hints = {section.name: get_type_hints(section.default_factory) for section in fields(TrainConfig)}
    types = {}
    for name, (section, field) in OPTIONS.items():
        hint = hints[section][field.name]
        types[name] = next((t for t in get_args(hint) if t is not type(None)), hint)
    return types


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


# transformers' Trainer and TRL's names of our options, and what to write here instead.
OTHER_NAMES = {
    "learning_rate": "--lr", "num_train_epochs": "--epochs", "gradient_accumulation_steps": "--grad-accum",
    "per_device_train_batch_size": "--max-tokens-per-batch (a micro-batch's tokens per GPU, not rows)",
    "per_device_eval_batch_size": "--max-tokens-per-batch (a micro-batch's tokens per GPU, not rows)",
    "max_grad_norm": "--grad-clip", "lr_scheduler_type": "--lr-schedule", "adam_epsilon": "--adam-eps",
    "warmup_ratio": "--warmup-steps (a number of steps, not a fraction)",
    "bf16": "--dtype bf16", "fp16": "--dtype bf16", "torch_dtype": "--dtype", "attn_implementation": "--attn",
    "gradient_checkpointing": "--activation-checkpointing true", "use_liger_kernel": "--fused-kernels liger",
    "max_length": "--max-seq-len", "max_seq_length": "--max-seq-len",
    "model_name_or_path": "--model", "tokenizer_name": "--tokenizer",
    "dataset": "--data", "dataset_name": "--data", "train_file": "--data", "validation_file": "--eval-data",
    "dataset_num_proc": "--num-proc", "preprocessing_num_workers": "--num-proc",
    "assistant_only_loss": "--train-on-prompt false (the default: only the answers are learned)",
    "completion_only_loss": "--train-on-prompt false (the default: only the answers are learned)",
    "deepspeed": "--ds-config", "resume_from_checkpoint": "--resume",
    "use_peft": "--lora true", "lora_r": "--lora-rank", "lora_target_modules": "--lora-targets"}


def _did_you_mean(name: str) -> str:
    """'; did you mean --x?' for an unknown option name (ours misspelt, or another trainer's name), or ''."""
    key = name.lstrip("-").replace("-", "_")
    known = {**{name: flag(name) for name in OPTIONS}, "config": "--config",
             **OTHER_NAMES}
    match = next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.6)), None)
    return f"; did you mean {known[match]}?" if match else ""


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError (one line) where argparse would print its usage and exit."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see `python -m qwen_moe_ft.train -h`")


def _help(field: dataclasses.Field) -> str:
    default = field.default
    if isinstance(default, bool) or default == "":  # 0 == False and 1 == True: a dict lookup would match them too
        default = {True: "true", False: "false", "": '""'}[default]
    allowed = f"; one of {', '.join(choices)}" if (choices := field.metadata["choices"]) else ""
    return f"{field.metadata.get('help', '')} (default {default}{allowed})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """Every option as a flag by its flat name, with its help, default and allowed values, grouped by section."""
    types = _option_types()
    parser = _Parser(prog="qwen_moe_ft.train", usage="%(prog)s [--config RECIPE] [--option value ...]",
                     description="Fine-tune a Qwen3-MoE model. Options override the --config recipe, which overrides "
                     "the defaults shown.")
    parser.add_argument("--config", help="YAML recipe: a file, or the name of one in qwen_moe_ft/recipes/ (e.g. "
                        "tiny-packed); command-line options override it")
    groups = {section.name: parser.add_argument_group(section.metadata["title"]) for section in fields(TrainConfig)}
    for name, (section, field) in OPTIONS.items():
        group, spelled, kind = groups[section], flag(name), types[name]
        if kind is bool:
            group.add_argument(spelled, nargs="?", const="true", default=None, metavar="BOOL", help=_help(field))
        else:
            group.add_argument(spelled, default=None, metavar=kind.__name__.upper(), help=_help(field))
    return parser


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file() and (RECIPES / f"{path}.yaml").is_file():  # a packaged recipe by name
        path = RECIPES / f"{path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise ConfigError(f"--config: {path} does not exist; a YAML file, or a recipe shipped with the package by "
                          f"name: {shipped}")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML ({getattr(err, 'problem', None) or err}{where})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"--config {path}: expected `option: value` lines, got a {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(OPTIONS))
    if unknown:  # each with its suggestion, the one with a suggestion first
        unknown.sort(key=lambda name: not _did_you_mean(name))
        raise ConfigError(f"{path}: unknown option {unknown[0]}{_did_you_mean(unknown[0])}"
                          + "".join(f"; unknown option {name}{_did_you_mean(name)}" for name in unknown[1:]))
    types = _option_types()
    try:  # a bad value named with the file it is in
        return {name: _coerce(name, value, types[name]) for name, value in recipe.items()}
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML recipe given by --config, then --key value options, in that order."""
    types = _option_types()
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        first = unknown[0]
        if first.startswith("-"):
            raise ConfigError(f"unknown option {first.split('=')[0]}{_did_you_mean(first.split('=')[0])}")
        raise ConfigError(f"unexpected argument {first!r}; options are --key value pairs")
    values: dict[str, Any] = _read_recipe(Path(args.config)) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in types and v is not None})
    return TrainConfig.from_flat(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
