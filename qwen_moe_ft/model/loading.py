"""Loading the model and tokenizer, from the hub or a local directory, the same way for every size."""
from __future__ import annotations

import os
import sys

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from ..config import REAL_MODEL, ModelConfig
from ..local_paths import looks_local
from ..parallel.expert_parallel import apply_autoep
from .rank_local import load_rank_local
from .shards import ModelLoadError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# What each loader needs in a local directory, for the message when it is not there.
LOCAL_FILES = {"config": "config.json", "tokenizer": "tokenizer files (tokenizer.json or vocab)",
               "weights": "weights (*.safetensors)"}


def _no_such_directory(name: str) -> None:
    """Raises for a local-looking name (local_paths.looks_local) that is no directory, before the hub is asked for
    it: the hub's answer would be about repo ids, after its retries."""
    if looks_local(name) and not os.path.isdir(name):
        raise ModelLoadError(f"{name}: no such directory; --model (and --tokenizer) take a directory written by "
                             f"save_pretrained or `hf download`, or a hub id like {REAL_MODEL}")


def _not_found(name: str, what: str, err: Exception) -> ModelLoadError:
    if os.path.isdir(name):  # a local directory: downloading it again is not the advice
        return ModelLoadError(f"{name} is a local directory without {LOCAL_FILES[what]}; point --model (or "
                              "--tokenizer) at a directory written by save_pretrained or `hf download`")
    return ModelLoadError(
        f"could not load the {what} of '{name}' ({type(err).__name__}: {str(err).splitlines()[0]}). "
        f"Without network access, download it where you have one (`hf download {name} --local-dir DIR`) "
        "and pass --model DIR (and --tokenizer DIR if the tokenizer lives elsewhere).")


def load_model_config(cfg: ModelConfig, name: str):
    _no_such_directory(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _not_found(name, "config", err) from err
    if config.model_type != "qwen3_moe":
        # Qwen2-MoE would train, but its shared expert is exported under names transformers does not load back.
        raise ModelLoadError(f"--model {name} is a '{config.model_type}' model; this package trains Qwen3-MoE "
                             "models only (model_type qwen3_moe, e.g. Qwen/Qwen3-30B-A3B)")
    if cfg.num_hidden_layers:
        config.num_hidden_layers = cfg.num_hidden_layers
    config.use_cache = False
    return config


def load_tokenizer(cfg: ModelConfig, name: str):
    source = cfg.tokenizer or name
    _no_such_directory(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _not_found(source, "tokenizer", err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_dir(name: str) -> str:
    """`name` itself if it is a directory, else the hub snapshot of its config and safetensors (cached)."""
    if os.path.isdir(name):
        return name
    _no_such_directory(name)
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:  # offline, unknown repo, no access: all end the same way for the user
        raise _not_found(name, "weights", err) from err


def load_model(cfg: ModelConfig, name: str, config, attn_implementation: str, ds_config: dict, rank: int):
    """bf16 (or fp32) weights from `name` in AutoEP's layout, only this rank's experts read (rank_local.py);
    with --random-init, fresh weights from its config."""
    dtype = DTYPES[cfg.dtype]
    if cfg.random_init:
        # Initialising billions of weights is minutes on the CPU and seconds on the GPU.
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        apply_autoep(model, ds_config, rank)
        return model
    directory = _local_dir(name)
    model = load_rank_local(directory, config, dtype, attn_implementation, ds_config, rank)
    if os.path.exists(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside a DeepSpeed engine and/or PEFT wrapper."""
    # DeepSpeedEngine and PeftModel forward unknown attributes to what they wrap: test types, not hasattr.
    # peft is imported by LoRA runs only (a second a process): without it in sys.modules there is no PeftModel.
    peft = sys.modules.get("peft")
    while not (isinstance(model, PreTrainedModel) and hasattr(model, "lm_head")):
        if peft is not None and isinstance(model, peft.PeftModel):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            raise TypeError(f"{type(model).__name__} holds no causal LM with an lm_head")
    return model
