"""check_sp_size: --sp-size against the number of processes and the model's attention heads (Qwen3-30B-A3B: 32
query heads, 4 key/value heads; the tiny model: 4 and 2)."""
from types import SimpleNamespace

import pytest

from qwen_moe_ft.config import ConfigError
from qwen_moe_ft.parallel.sequence_parallel import check_sp_size

QWEN3_30B_A3B = SimpleNamespace(num_attention_heads=32, num_key_value_heads=4)
TINY = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("sp, world", [(1, 1), (2, 2), (2, 8), (4, 8), (8, 8)])
def test_sizes_ulysses_can_split(sp, world):
    check_sp_size(sp, world, QWEN3_30B_A3B)  # SP=8: each rank a copy of one of the 4 key/value heads


@pytest.mark.parametrize("sp, world, model, message", [
    (2, 3, TINY, "--sp-size 2 does not divide the world size 3"),
    (8, 8, TINY, "--sp-size 8 does not divide the model's 4 attention heads"),
    (3, 6, SimpleNamespace(num_attention_heads=6, num_key_value_heads=2),
     "--sp-size 3 and the model's 2 key/value heads: one must divide the other"),
])
def test_sizes_ulysses_cannot_split_are_errors(sp, world, model, message):
    with pytest.raises(ConfigError, match=message):
        check_sp_size(sp, world, model)
