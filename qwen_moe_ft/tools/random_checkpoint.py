"""A random checkpoint of a model's full width in the hub layout, to measure loading at real size.

    python -m qwen_moe_ft.tools.random_checkpoint --config data/qwen3-30b-a3b-config --layers 24 --out DIR

Writes config.json (num_hidden_layers = --layers) and safetensors shards of at most --max-shard-size with
`model.safetensors.index.json`, experts under the hub's per-expert keys (hub_layout.py). Tensors are made
and written one at a time, so memory stays about one shard. Weights ~ N(0, initializer_range), norms 1.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from ..model.hub_layout import PROJ
from ..model.shard_writer import ShardWriter
from ..bench.harness import tool_parser

FUSED = re.compile(r"^(?P<layer>.*\.mlp\.experts)\.(?P<fused>gate_up_proj|down_proj)$")


def hub_layout(config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every key of the hub checkpoint of `config` with a meta tensor of its shape, one layer after another."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout = {}
    for name, param in model.named_parameters():
        if match := FUSED.match(name):
            experts, rows = param.shape[0], param.shape[1]
            parts = [("w1", slice(0, rows // 2)), ("w3", slice(rows // 2, rows))] if match["fused"] == "gate_up_proj" \
                else [("w2", slice(None))]
            for e in range(experts):
                for w, part in parts:
                    # a tensor of its own: a view would count its whole fused base in the shard sizes
                    layout[f"{match['layer']}.{e}.{PROJ[w]}.weight"] = torch.empty_like(param[e, part], device="meta")
        else:
            layout[name] = param
    return layout


def write_random_checkpoint(config_dir: str, layers: int, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                            max_shard_size: str = "5GB", seed: int = 0) -> Path:
    config = AutoConfig.from_pretrained(config_dir)
    config.num_hidden_layers = layers
    config.dtype = dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = hub_layout(config, dtype)
    writer = ShardWriter(out, layout, max_shard_size)
    generator = torch.Generator().manual_seed(seed)
    for key, meta in layout.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(meta.shape, dtype=dtype)
        else:
            tensor = torch.empty(meta.shape, dtype=dtype).normal_(0.0, config.initializer_range, generator=generator)
        writer.add(key, tensor)
    writer.close()
    config.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.tools.random_checkpoint", __doc__)
    parser.add_argument("--config", required=True, help="directory (or hub id) of the model's config.json")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_random_checkpoint(args.config, args.layers, args.out, max_shard_size=args.max_shard_size,
                                  dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
