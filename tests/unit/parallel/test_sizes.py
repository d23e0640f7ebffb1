"""--ep-size against the number of processes and the model's experts (choose_ep_size), --sp-size against the
number of processes and the model's attention heads (check_sp_size; Qwen3-30B-A3B: 32 query heads, 4 key/value heads;
the tiny model: 4 and 2)."""
from types import SimpleNamespace

import pytest

from qwen_moe_ft.config import ConfigError
from qwen_moe_ft.parallel.sizes import check_sp_size, choose_ep_size

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


def test_ep_size_auto_is_largest_common_divisor():
    assert choose_ep_size(0, 8, 128) == 8
    assert choose_ep_size(0, 6, 128) == 2
    assert choose_ep_size(0, 2, 8) == 2
    assert choose_ep_size(0, 1, 8) == 1


@pytest.mark.parametrize("ep, world, experts, what", [(3, 8, 128, "world size"), (4, 4, 6, "experts")])
def test_impossible_ep_size_is_an_error(ep, world, experts, what):
    with pytest.raises(ConfigError, match=f"--ep-size {ep}.*{what}"):
        choose_ep_size(ep, world, experts)
