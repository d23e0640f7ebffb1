"""LoRA's layout-free checkpoint: each rank's share of the factors' fp32 master weights and Adam moments, whole,
read back at any number of processes or EP size."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param
from deepspeed.utils import safe_set_full_optimizer_state

from ..model.lora import ExpertLoRA
from ..parallel.expert_parallel import in_ep_group_of
from .layout import LORA_SLICES, MOMENTS, CheckpointError, _lora_file, _lora_partition_file

def _expert_layers(model) -> dict[str, Any]:
    """The name of each LoRA factor of this rank's experts -> its AutoEP layer."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoRA):
            layer = model.get_submodule(name.rpartition(".")[0])
            layers.update({f"{name}.{factor}": layer for factor, _ in module.named_parameters(recurse=False)})
    return layers


def _save_lora(engine, path: Path, step: int, rank: int):
    """This rank's layout-free share: every trainable weight's fp32 master and moments whole (an expert factor: this
    rank's experts), gathered over its data-parallel group; ranks of EP group 0 keep the expert factors, rank 0 the
    rest. Collective: every rank takes part in every parameter's gathers."""
    experts, slices = _expert_layers(engine.module), {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        values = {"fp32": safe_get_full_fp32_param(param),
                  **{key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}}
        layer = experts.get(name)
        if in_ep_group_of(layer, 0) if layer is not None else rank == 0:
            first = layer.ep_rank * layer.num_local_experts if layer is not None else None
            slices[name] = {"first_expert": first, **{k: v.to("cpu", copy=True) for k, v in values.items()}}
    adam = engine.optimizer.optimizer
    torch.save({"step": step, "slices": slices, "adam_step": float(next(iter(adam.state.values()))["step"]),
                "scheduler": engine.lr_scheduler.state_dict(), "global_steps": engine.global_steps,
                "global_samples": engine.global_samples, "skipped_steps": engine.skipped_steps},
               _lora_file(path, rank))


def _layout_free_value(path: Path, name: str, pieces: list[dict], key: str, param, layer) -> torch.Tensor:
    """`name`'s `key` at this rank's layout, from the pieces the saving ranks wrote."""
    if not pieces:
        raise CheckpointError(f"{path} holds no LoRA state of {name}: saved with other --lora-targets")
    if layer is None:
        value = pieces[0][key]
    else:  # this rank's experts, from the pieces holding them only (the files are memory-mapped: nothing else is read)
        first, last = layer.ep_rank * layer.num_local_experts, (layer.ep_rank + 1) * layer.num_local_experts
        parts = []
        for piece in sorted(pieces, key=lambda p: p["first_expert"]):
            start = piece["first_expert"]
            lo, hi = max(first, start), min(last, start + piece[key].shape[0])
            if lo < hi:
                parts.append(piece[key][lo - start:hi - start])
        value = torch.cat(parts) if parts else torch.empty(0)
    if value.shape != param.shape:
        raise CheckpointError(f"{path}: {name} was saved as {tuple(value.shape)}, this run's is {tuple(param.shape)} "
                              "(another --lora-rank?)")
    return value


def _legacy_lora_name(name: str) -> str:
    """`name` as LoRA checkpoints written under PEFT's attention wrappers named it (the model inside PEFT's
    `base_model.model.`, the attention factors under its adapter name `default`)."""
    for factor in ("lora_A", "lora_B"):
        name = name.replace(f".{factor}.weight", f".{factor}.default.weight")
    return "base_model.model." + name


def _load_lora(engine, path: Path) -> int:
    """The layout-free LoRA state into this rank's ZeRO partitions, at whatever layout this run has."""
    # every rank reads every share's index, but through mmap only the bytes of the slices it loads (a 30B model's
    # whole LoRA state is ~8 GB of fp32 weights and moments: not once per rank in host memory)
    shares = {f: torch.load(f, weights_only=False, mmap=True) for f in path.glob(LORA_SLICES.format("*"))}
    pieces = defaultdict(list)
    for share in shares.values():
        for name, piece in share["slices"].items():
            pieces[name].append(piece)
    common = shares[_lora_file(path, 0)]
    optimizer, adam = engine.optimizer, engine.optimizer.optimizer
    # Adam's state for every flat partition, zero, through the optimizer's own load (its dtypes and devices); the
    # saved values go in below through DeepSpeed's per-parameter fragments
    template = adam.state_dict()
    template["state"] = {index: {"step": torch.tensor(common["adam_step"]), **{k: torch.zeros_like(master)
                                                                               for k in MOMENTS}}
                         for index, master in enumerate(p for group in adam.param_groups for p in group["params"])}
    adam.load_state_dict(template)
    optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter's fragments to the new state
    experts = _expert_layers(engine.module)
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            layer = experts.get(name)
            saved = pieces.get(name) or pieces.get(_legacy_lora_name(name), [])
            safe_set_full_fp32_param(param, _layout_free_value(path, name, saved, "fp32", param, layer))
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, _layout_free_value(path, name, saved, key, param, layer), key)
    optimizer.update_lp_params()  # the weights from the fp32 masters (collective)
    engine.lr_scheduler.load_state_dict(common["scheduler"])
    for group, lr in zip(adam.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps, engine.global_samples = common["global_steps"], common["global_samples"]
    engine.skipped_steps = common["skipped_steps"]
    return int(common["step"])


def _load_lora_partitions(engine, path: Path, rank: int) -> int:
    """A LoRA checkpoint of earlier versions (check_layout lets only its own layout through)."""
    state = torch.load(_lora_partition_file(path, rank), weights_only=False)
    params = {name: param for name, param in engine.module.named_parameters()}
    params.update({_legacy_lora_name(name): param for name, param in params.items()})
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer = engine.optimizer
    # ZeRO reads only this rank's entry of the list; fp32 master weights come from it, not from the bf16 copies
    ranks = dist.get_world_size(optimizer.dp_process_group) if dist.is_initialized() else 1
    optimizer.load_state_dict([state["optimizer"]] * ranks, load_optimizer_states=True, load_from_fp32_weights=True)
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    return int(state["step"])
