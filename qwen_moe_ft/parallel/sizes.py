"""The expert- and sequence-parallel sizes checked against the number of processes and the model: plain arithmetic,
importing neither torch nor DeepSpeed, so the check before launch (cli.py) and the memory estimate make it too."""
from __future__ import annotations

from ..config import ConfigError


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


def check_sp_size(sp_size: int, world_size: int, model_config) -> None:
    """--sp-size against the number of processes and the model's attention heads (UlyssesSPAttentionHF splits the
    query heads over the SP group, and the key/value heads too, or copies them where there are fewer than ranks)."""
    if world_size % sp_size:
        raise ConfigError(f"--sp-size {sp_size} does not divide the world size {world_size} (number of processes); "
                          "use a divisor of it")
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % sp_size:
        raise ConfigError(f"--sp-size {sp_size} does not divide the model's {heads} attention heads; use a divisor "
                          f"of {heads}")
    if kv_heads % sp_size and sp_size % kv_heads:
        raise ConfigError(f"--sp-size {sp_size} and the model's {kv_heads} key/value heads: one must divide the "
                          "other")
