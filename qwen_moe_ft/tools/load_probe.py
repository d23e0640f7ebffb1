"""Load time and peak host memory of one rank's model, today's path against the rank-local one; optionally the
export's extra GPU memory. JSON on stdout.

    python -m qwen_moe_ft.tools.load_probe --model DIR --ep-size 8 --rank 0 [--old]
    torchrun --nproc_per_node 8 -m qwen_moe_ft.tools.load_probe --model DIR --export OUT

One process stands for rank --rank of an EP group of --ep-size: `--old` is from_pretrained of the whole model
and AutoEP's replacement (what every rank did before rank_local.py), the default is rank_local.py. Under
torchrun (--ep-size defaults to the world size) with --export, every rank then moves its model to its GPU and
writes OUT with model/export.py; the JSON adds the GPU memory the export added to the peak.
"""
from __future__ import annotations

import json
import os
import resource
import time

import torch

from ..bench.harness import tool_parser


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.tools.load_probe", __doc__)
    parser.add_argument("--model", required=True, help="a local checkpoint directory")
    parser.add_argument("--ep-size", type=int, default=0, help="0: the world size")
    parser.add_argument("--rank", type=int, default=None, help="the rank to stand for (default: this process's)")
    parser.add_argument("--old", action="store_true", help="from_pretrained, then AutoEP (the path before)")
    parser.add_argument("--export", default=None, help="write the model here with the streaming export")
    args = parser.parse_args(argv)

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.rank_local import load_rank_local
    from ..parallel.ds_config import build_ds_config
    from ..parallel.expert_parallel import apply_autoep
    from ..parallel.process import ensure_process_env

    ensure_process_env()
    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    world, rank = dist.get_world_size(), args.rank if args.rank is not None else dist.get_rank()
    ep_size = args.ep_size or world
    ds_config = build_ds_config(ep_size=ep_size, world_size=max(world, ep_size),
                                device_type="cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(args.model)
    start = time.perf_counter()
    if args.old:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        apply_autoep(model, ds_config, rank)
    else:
        model = load_rank_local(args.model, config, torch.bfloat16, "sdpa", ds_config, rank)
    report = {"path": "old" if args.old else "rank_local", "model": args.model, "layers": config.num_hidden_layers,
              "ep_size": ep_size, "rank": rank, "load_seconds": round(time.perf_counter() - start, 2),
              "peak_rss_gib": round(_peak_rss_gib(), 2),
              "param_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)}
    if args.export:
        report.update(_export(model, args.export))
    print(json.dumps(report))
    dist.destroy_process_group()
    return 0


def _export(model, out: str) -> dict:
    """GPU memory the streaming export adds to the peak of a rank that holds its model on the GPU."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    from ..model.export import save_hf_checkpoint

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        model.cuda()
    for module in model.modules():
        if isinstance(module, AutoEPMoELayer):
            module.set_deepspeed_parallelism()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated() if cuda else 0
    start = time.perf_counter()
    save_hf_checkpoint(model, _NoTokenizer(), out, is_main=torch.distributed.get_rank() == 0)
    report = {"export_seconds": round(time.perf_counter() - start, 2),
              "peak_rss_gib_after_export": round(_peak_rss_gib(), 2)}
    if cuda:
        report["export_extra_gpu_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
    return report


class _NoTokenizer:
    """The probe exports weights only; save_hf_checkpoint asks the tokenizer to save itself."""

    def save_pretrained(self, _directory) -> None:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
