import pytest

from qwen_moe_ft.tools.attention_table import HEAD_DIM, HEADS, attention_flops


def test_attention_flops_count_the_causal_half_forward_and_backward():
    one = attention_flops([4096])
    assert one == pytest.approx(3.5 * 4 * 4096 * 4096 / 2 * HEAD_DIM * HEADS)
    assert attention_flops([2048, 2048]) == pytest.approx(one / 2)  # two halves: half the scores
