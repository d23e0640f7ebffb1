"""The benchmark's summary: per-layer figures from two depths, and none where they would be noise."""
import pytest

from qwen_moe_ft.bench.benchmark import document_lengths, summarise, table


def result(stack, depth, step_ms, spread, fwd_bwd_ms):
    return dict(stack=stack, depth=depth, attention="x", step_ms=step_ms, step_ms_spread=spread,
                fwd_bwd_ms=fwd_bwd_ms, optimizer_ms=step_ms - fwd_bwd_ms, peak_mem_gib=40.0 + depth,
                tokens=8192, mean_context=461.0, losses=[12.3, 12.2, 12.1])


def test_per_layer_figures_are_depth_differences():
    summary = summarise([result("ours", 2, 110.0, 1.0, 60.0), result("ours", 4, 160.0, 1.0, 85.0),
                         result("hf_grouped_mm", 2, 100.0, 1.0, 80.0), result("hf_grouped_mm", 4, 150.0, 1.0, 120.0),
                         result("deepspeed_stock", 2, 150.0, 1.0, 90.0), result("deepspeed_stock", 4, 230.0, 1.0, 130.0)],
                        (2, 4), peak=989.0)
    assert summary["ours"]["per_layer_ms"] == pytest.approx(25.0)
    assert summary["ours"]["fwd_bwd_per_layer_ms"] == pytest.approx(12.5)
    assert summary["ratios_hf_grouped_mm"]["fwd_bwd_per_layer_ms"] == pytest.approx(20.0 / 12.5)
    assert summary["ratios_deepspeed_stock"]["per_layer_ms"] == pytest.approx(40.0 / 25.0)
    printed = table(summary)
    assert "hf_grouped_mm/ours: per layer 1.00x, forward+backward 1.60x" in printed
    assert "deepspeed_stock/ours: per layer 1.60x" in printed
    # outside the layers: the 2-layer step less two layers (110 - 2 x 25), of which forward+backward 60 - 2 x 12.5
    assert summary["ours"]["outside_layers_ms"] == pytest.approx(60.0)
    assert summary["ours"]["outside_layers_fwd_bwd_ms"] == pytest.approx(35.0)
    assert summary["ours"]["outside_layers_optimizer_ms"] == pytest.approx(25.0)
    assert "ours: outside the layers 60.0 ms a step (forward+backward 35.0, optimizer 25.0: embedding, final norm, " \
           "LM head, loss), 38% of the 4-layer step" in printed


def test_traced_steps_give_the_gpus_busy_time_per_layer_and_the_waiting_per_step():
    low, high = result("ours", 2, 110.0, 1.0, 60.0), result("ours", 4, 160.0, 1.0, 85.0)
    low["trace"] = dict(steps=[dict(busy_ms=b) for b in (52.0, 50.0, 51.0)])
    high["trace"] = dict(steps=[dict(busy_ms=b) for b in (69.0, 67.0, 68.0)])
    summary = summarise([low, high, result("hf_grouped_mm", 2, 100.0, 1.0, 80.0),
                         result("hf_grouped_mm", 4, 150.0, 1.0, 120.0)], (2, 4), peak=989.0)
    assert summary["ours"]["busy_per_layer_ms"] == pytest.approx(8.5)  # medians 51 and 68
    assert summary["ours"]["waiting_ms_2L"] == pytest.approx(9.0)  # 60 - 51
    assert summary["ours"]["waiting_ms_4L"] == pytest.approx(17.0)
    assert "busy_per_layer_ms" not in summary["hf_grouped_mm"]  # not traced
    assert "ours, traced: the GPU busy 8.5 ms a layer of forward+backward; the untraced forward+backward waits " \
           "9.0 / 17.0 ms a step" in table(summary)


def test_a_depth_difference_within_the_step_spread_gives_no_per_layer_figures():
    # The padded baseline on mixed-length documents, as measured on an H100 80GB: 645.0 ms at 2 layers and
    # 648.9 at 4, its steps varying by far more than that (padding to each batch's longest document).
    summary = summarise([result("ours", 2, 107.5, 2.0, 50.0), result("ours", 4, 160.2, 2.0, 75.0),
                         result("hf_grouped_mm", 2, 645.0, 120.0, 600.0),
                         result("hf_grouped_mm", 4, 648.9, 120.0, 590.0)], (2, 4), peak=989.0)
    assert summary["hf_grouped_mm"]["per_layer_within_noise"]
    assert "per_layer_ms" not in summary["hf_grouped_mm"] and "ratios_hf_grouped_mm" not in summary
    assert summary["ours"]["per_layer_ms"] == pytest.approx(26.35)
    printed = table(summary)
    assert "| hf_grouped_mm | x | n/a |" in printed and "compare whole steps" in printed


def test_one_depth_gives_whole_steps_and_tokens_per_second_ratios():
    summary = summarise([result("ours", 48, 400.0, 5.0, 300.0), result("hf_peft_lora", 48, 1000.0, 5.0, 900.0)],
                        (48,), peak=989.0, frozen_weights=True)
    assert "per_layer_ms" not in summary["ours"]
    assert summary["ours"]["tokens_per_s"] == pytest.approx(8192 / 0.4)
    assert summary["ratios_hf_peft_lora"]["tokens_per_s"] == pytest.approx(2.5)
    assert summary["ours"]["step_mfu"] < summary["ours"]["tokens_per_s"] * 6 * 3.4e9 / 989e12  # 4N, not 6N
    printed = table(summary)
    assert "| hf_peft_lora | x | 1000.0 |" in printed and "ours/hf_peft_lora tokens/s: 2.50x" in printed


@pytest.mark.parametrize("lengths", ["full", "whole", "chat", "mixed"])
def test_document_lengths_fill_the_micro_batch(lengths):
    import random

    docs = document_lengths(32768, lengths, random.Random(0))
    assert sum(docs) == 32768
    if lengths in ("whole", "full"):
        assert docs == {"whole": [32768], "full": [4096] * 8}[lengths]
    else:  # log-normal, cut at 4096
        assert max(docs) <= 4096
