"""Expert-parallel sizing and the DeepSpeed config (ZeRO-2 + AutoEP) a run hands to Accelerate."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .config import ConfigError, TrainConfig


def choose_ep_size(requested: int, world_size: int, num_experts: int) -> int:
    """--ep-size, checked; 0 picks the largest size dividing both the world size and the expert count."""
    if requested == 0:
        return max(d for d in range(1, world_size + 1) if world_size % d == 0 and num_experts % d == 0)
    if world_size % requested:
        raise ConfigError(f"--ep-size {requested} does not divide the world size {world_size} (number of "
                          f"processes); use a divisor of it, or 0 for automatic")
    if num_experts % requested:
        raise ConfigError(f"--ep-size {requested} does not divide the model's {num_experts} experts; "
                          f"use a divisor of {num_experts}, or 0 for automatic")
    return requested


def build_ds_config(cfg: TrainConfig, ep_size: int, world_size: int, device_type: str = "cuda") -> dict:
    """The DeepSpeed config file of --ds-config with every value this run decides filled in.

    ds_configs/zero2_ep.json is the fast path measured in BENCHMARKS.md: AutoEP's one-GEMM gate/up
    projection and Triton weighted combine, and reduce buckets smaller than one expert weight, so the
    expert gradients are reduced where they lie instead of being copied into a bucket first.
    """
    ds = json.loads(Path(cfg.ds_config).read_text())
    ds["train_micro_batch_size_per_gpu"] = 1  # one packed row (or one padded batch) per micro-step
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = world_size * cfg.grad_accum
    ds["gradient_clipping"] = cfg.grad_clip
    # The loss is already a mean over the global batch's label tokens (loss.backward_scale), so ranks'
    # gradients add; "mean" would divide every gradient by the world size in a pass of its own.
    ds["gradient_allreduce_op"] = "sum"
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.dtype == "bf16"}
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": cfg.zero_stage}
    # torch's AdamW rather than DeepSpeed's FusedAdam: zero_step.fuse_adam_step swaps it for the one-pass
    # MasterAdamW; where that does not apply, the fused torch kernel takes the clip factor (fold_clip_into_adam)
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [cfg.adam_beta1, cfg.adam_beta2],
                                                   "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay,
                                                   "torch_adam": True, "fused": True}}
    ds.pop("scheduler", None)  # the schedule is ours (LambdaLR), stepped by the engine
    ds["expert_parallel"] = {"preset_model": "qwen3_moe", **ds.get("expert_parallel", {}),
                             "enabled": True, "autoep_size": ep_size}
    if device_type != "cuda" and ds["expert_parallel"].get("combine_impl") == "fused_weighted_sum":
        ds["expert_parallel"]["combine_impl"] = "weighted_sum"  # a Triton kernel: CUDA only; same sum
    return ds


def ensure_process_env() -> None:
    """A plain `python train.py` (or a one-process `accelerate launch`) gets a one-rank process group:
    DeepSpeed and AutoEP need one even on a single GPU."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        os.environ.setdefault(key, value)
