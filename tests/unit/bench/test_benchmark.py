"""The benchmark's summary: per-layer figures from two depths, and none where they would be noise; each step's
split into the decoder layers, the LM head + loss, the optimizer and the rest; the events that time the head + loss."""
import time

import pytest
import torch

from qwen_moe_ft.bench.benchmark import HeadLossSpans, document_lengths, summarise, table
from qwen_moe_ft.model.loading import causal_lm_of


def result(stack, depth, step_ms, spread, fwd_bwd_ms, head_loss_ms=10.0):
    return dict(stack=stack, depth=depth, attention="x", step_ms=step_ms, step_ms_spread=spread,
                fwd_bwd_ms=fwd_bwd_ms, optimizer_ms=step_ms - fwd_bwd_ms, head_loss_ms=head_loss_ms,
                peak_mem_gib=40.0 + depth, tokens=8192, mean_context=461.0, losses=[12.3, 12.2, 12.1])


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


def test_the_per_layer_figure_carries_the_standard_error_of_its_two_medians():
    low, high = result("ours", 2, 110.0, 1.349, 60.0), result("ours", 4, 160.0, 2 * 1.349, 85.0)
    low["steps_ms"], high["steps_ms"] = [110.0] * 4, [160.0] * 16  # only their number counts: the spread is given
    summary = summarise([low, high], (2, 4), peak=989.0)
    # sigma = IQR / 1.349: 1 and 2 ms; a median's error 1.2533 sigma / sqrt(n): 0.6267 and 0.6267; their root sum
    # of squares over the 2 added layers
    assert summary["ours"]["per_layer_ms_standard_error"] == pytest.approx(1.2533 * 2 ** 0.5 / 2 / 2, rel=1e-4)
    assert "| ours | x | 25.0 ±0.44 |" in table(summary)
    without_steps = summarise([result("ours", 2, 110.0, 1.0, 60.0), result("ours", 4, 160.0, 1.0, 85.0)], (2, 4), 989.0)
    assert "| ours | x | 25.0 |" in table(without_steps)  # results without their steps: no error to give


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


def shares(split):
    return sum(v for k, v in split.items() if k.endswith("_share"))


def test_two_depths_split_each_step_into_layers_head_and_loss_optimizer_and_the_rest():
    summary = summarise([result("ours", 2, 110.0, 1.0, 60.0, head_loss_ms=20.0),
                         result("ours", 4, 160.0, 1.0, 85.0, head_loss_ms=21.0),
                         result("hf_grouped_mm_packed", 2, 150.0, 1.0, 90.0, head_loss_ms=30.0),
                         result("hf_grouped_mm_packed", 4, 230.0, 1.0, 130.0, head_loss_ms=30.0)], (2, 4), peak=989.0)
    split = summary["ours"]["step_breakdown"]["4L"]
    # layers: 4 x 12.5 ms of forward+backward; rest: 85 - 21 - 50
    assert split["head_loss_ms"] == 21.0 and split["fwd_bwd_ms"] == 85.0 and split["optimizer_ms"] == 75.0
    assert split["layers_share"] == pytest.approx(50.0 / 160.0)
    assert split["head_loss_share"] == pytest.approx(21.0 / 160.0)
    assert split["optimizer_share"] == pytest.approx(75.0 / 160.0)
    assert split["rest_share"] == pytest.approx(14.0 / 160.0)
    for stack in ("ours", "hf_grouped_mm_packed"):
        for depth in ("2L", "4L"):
            assert shares(summary[stack]["step_breakdown"][depth]) == pytest.approx(1.0)
    printed = table(summary)
    assert "| stack | depth | step ms | fwd+bwd ms | head+loss ms | optimizer ms | layers % | head+loss % | " \
           "optimizer % | rest % |" in printed
    assert "| ours | 4L | 160.0 | 85.0 | 21.0 | 75.0 | 31% | 13% | 47% | 9% |" in printed
    assert "| hf_grouped_mm_packed | 2L | 150.0 | 90.0 | 30.0 | 60.0 | 27% | 20% | 40% | 13% |" in printed


def test_one_depth_or_noisy_depths_give_the_layers_and_the_rest_together():
    one_depth = summarise([result("ours", 48, 400.0, 5.0, 300.0, head_loss_ms=40.0),
                           result("hf_peft_lora", 48, 1000.0, 5.0, 900.0, head_loss_ms=100.0)], (48,), peak=989.0)
    split = one_depth["ours"]["step_breakdown"]["48L"]
    assert "layers_share" not in split and split["layers_and_rest_share"] == pytest.approx(260.0 / 400.0)
    assert shares(split) == pytest.approx(1.0)
    printed = table(one_depth)
    assert "| ours | 48L | 400.0 | 300.0 | 40.0 | 100.0 | n/a | 10% | 25% | n/a |" in printed
    assert "ours at 48L: the decoder layers and the rest together 65%" in printed
    noisy = summarise([result("ours", 2, 107.5, 2.0, 50.0), result("ours", 4, 160.2, 2.0, 75.0),
                       result("hf_grouped_mm", 2, 645.0, 120.0, 600.0),
                       result("hf_grouped_mm", 4, 648.9, 120.0, 590.0)], (2, 4), peak=989.0)
    assert "layers_share" in noisy["ours"]["step_breakdown"]["4L"]
    assert "layers_and_rest_share" in noisy["hf_grouped_mm"]["step_breakdown"]["4L"]


def test_results_without_a_head_and_loss_time_give_no_split():
    old = [{k: v for k, v in result("ours", d, 100.0 + 25 * d, 1.0, 60.0 + 12 * d).items() if k != "head_loss_ms"}
           for d in (2, 4)]
    summary = summarise(old, (2, 4), peak=989.0)
    assert "step_breakdown" not in summary["ours"] and "head+loss" not in table(summary)


class WallClockEvent:
    """torch.cuda.Event's record and elapsed_time, on the host's clock."""

    def __init__(self):
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def elapsed_time(self, end):
        return 1e3 * (end.at - self.at)


def tiny_causal_lm(checkpointing: bool):
    from transformers import AutoModelForCausalLM

    from qwen_moe_ft.config import TINY_MODEL, ModelConfig
    from qwen_moe_ft.model.checkpointing import enable_activation_checkpointing
    from qwen_moe_ft.model.loading import load_model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_model_config(ModelConfig(random_init=True), TINY_MODEL))
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def accumulated_step(model, micro_batches):
    """Forward and backward of each micro-batch, as the transformers stack's step does: the loss and the
    gradients."""
    total = 0.0
    for ids in micro_batches:
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1),
                                                 ids[:, 1:].flatten())
        loss.backward()
        total += loss.item()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_head_and_loss_spans_pair_up_per_micro_batch_and_leave_the_step_alone(checkpointing):
    model = tiny_causal_lm(checkpointing)
    micro_batches = [torch.randint(0, 2048, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    untimed_loss, untimed_grads = accumulated_step(model, micro_batches)
    with HeadLossSpans(causal_lm_of(model), new_event=WallClockEvent) as head_loss:
        assert len(model.model.norm._forward_hooks) == 1
        timed_loss, timed_grads = accumulated_step(model, micro_batches)
        spans = list(head_loss.spans)
        total_ms = head_loss.take_ms()
        assert head_loss.spans == [] and head_loss.take_ms() == 0.0
        with torch.no_grad():  # an evaluation's forward: no backward to time
            model(input_ids=micro_batches[0])
        assert head_loss.spans == []
    assert not model.model.norm._forward_hooks
    assert timed_loss == untimed_loss
    assert all(torch.equal(a, b) for a, b in zip(timed_grads, untimed_grads))
    # one span a micro-batch, closed by its backward before the next micro-batch's forward; summed
    assert len(spans) == 3 and all(end.at >= start.at for start, end in spans)
    assert all(earlier[1].at <= later[0].at for earlier, later in zip(spans, spans[1:]))
    assert total_ms == pytest.approx(sum(1e3 * (end.at - start.at) for start, end in spans))
