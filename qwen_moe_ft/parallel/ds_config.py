"""The DeepSpeed config (ZeRO-2 + AutoEP) a run hands to Accelerate."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import OptimConfig, ParallelConfig


def build_ds_config(ep_size: int, world_size: int, device_type: str = "cuda", *,
                    parallel: ParallelConfig = ParallelConfig(), optim: OptimConfig = OptimConfig(),
                    dtype: str = "bf16") -> dict:
    """The DeepSpeed config file of --ds-config with every value this run decides filled in.

    ds_configs/zero2_ep.json is the fast path measured in BENCHMARKS.md: AutoEP's one-GEMM gate/up
    projection and Triton weighted combine, and reduce buckets smaller than one expert weight, so the
    expert gradients are reduced where they lie instead of being copied into a bucket first.
    """
    ds = json.loads(Path(parallel.ds_config).read_text())
    ds["train_micro_batch_size_per_gpu"] = 1  # one packed row (or one padded batch) per micro-step
    ds["gradient_accumulation_steps"] = optim.grad_accum
    ds["train_batch_size"] = world_size * optim.grad_accum
    ds["gradient_clipping"] = optim.grad_clip
    # The loss is already a mean over the global batch's label tokens (loss.backward_scale), so ranks'
    # gradients add; "mean" would divide every gradient by the world size in a pass of its own.
    ds["gradient_allreduce_op"] = "sum"
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == "bf16"}
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": parallel.zero_stage}
    # torch's fused AdamW rather than DeepSpeed's FusedAdam: the fast path swaps it for its one-pass AdamW
    # (fastpath/zero_step.py), and stock DeepSpeed runs it as it is
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": [optim.adam_beta1, optim.adam_beta2],
                                                   "eps": optim.adam_eps, "weight_decay": optim.weight_decay,
                                                   "torch_adam": True, "fused": True}}
    ds.pop("scheduler", None)  # the schedule is ours (LambdaLR), stepped by the engine
    ds["expert_parallel"] = {"preset_model": "qwen3_moe", **ds.get("expert_parallel", {}),
                             "enabled": True, "autoep_size": ep_size}
    if device_type != "cuda" and ds["expert_parallel"].get("combine_impl") == "fused_weighted_sum":
        ds["expert_parallel"]["combine_impl"] = "weighted_sum"  # a Triton kernel: CUDA only; same sum
    return ds
