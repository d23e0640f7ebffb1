"""Where each weight of the AutoEP model lives in a Qwen3-MoE checkpoint on the hub, and back.

AutoEP keeps, per MoE layer, this rank's contiguous block of experts as `experts.w1` (gate), `experts.w3`
(up), both [E_local, I, H], and `experts.w2` (down) [E_local, H, I], and the router as `router.gate`.
Hub checkpoints (and transformers' save_pretrained) hold one `mlp.experts.{e}.{gate,up,down}_proj.weight`
per expert and `mlp.gate.weight`; `save_pretrained(save_original_format=False)` writes the experts fused,
as transformers 5 keeps them in memory: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and
`mlp.experts.down_proj` [E, H, I].
"""
from __future__ import annotations

import re

EXPERT = re.compile(r"^(?P<layer>.*\.mlp)\.experts\.(?P<w>w[123])$")
ROUTER = re.compile(r"^(?P<layer>.*\.mlp)\.router\.gate\.weight$")
PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def dense_key(name: str) -> str:
    """The checkpoint key of a parameter that is not an expert weight."""
    if match := ROUTER.match(name):
        return f"{match['layer']}.gate.weight"
    return name


def expert_key(layer: str, w: str, expert: int) -> str:
    """The per-expert checkpoint key of expert `expert`'s weight `w` (w1, w2 or w3) in `layer` (`...mlp`)."""
    return f"{layer}.experts.{expert}.{PROJ[w]}.weight"


def fused_key(layer: str, w: str, inter: int) -> tuple[str, slice]:
    """The fused checkpoint key holding weight `w` of every expert, and the rows of its dim 1 that are `w`."""
    if w == "w2":
        return f"{layer}.experts.down_proj", slice(None)
    return f"{layer}.experts.gate_up_proj", slice(0, inter) if w == "w1" else slice(inter, 2 * inter)
