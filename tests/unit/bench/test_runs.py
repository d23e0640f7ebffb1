"""`bench --runs N`: each run summarised on its own, set side by side with the runs' spread and the lowest ratio."""
import pytest

from qwen_moe_ft.bench.benchmark import ALL_STACKS, BASELINES, summarise
from qwen_moe_ft.bench.runs import runs_table, spread


def result(stack, depth, step_ms, run):
    return dict(stack=stack, depth=depth, attention="x", step_ms=step_ms, step_ms_spread=1.349,
                fwd_bwd_ms=0.9 * step_ms, optimizer_ms=0.1 * step_ms, head_loss_ms=10.0, peak_mem_gib=40.0, tokens=8192, mean_context=461.0,
                losses=[12.3], steps_ms=[step_ms] * 4, run=run)


def test_spread_is_the_range_over_the_smallest():
    assert spread([10.0, 10.5, 11.0]) == pytest.approx(0.1)
    assert spread([7.0]) == 0.0


def test_each_run_side_by_side_with_the_spread_and_the_lowest_ratio():
    # ours 25, 26, 25 ms a layer; transformers 50 ms a layer in every run: ratios 2.00x, 1.92x, 2.00x
    per_run = []
    for run, ours_4 in enumerate((160.0, 162.0, 160.0)):
        results = [result("ours", 2, 110.0, run), result("ours", 4, ours_4, run),
                   result("hf_grouped_mm", 2, 200.0, run), result("hf_grouped_mm", 4, 300.0, run)]
        per_run.append(summarise(results, (2, 4), peak=989.0))
    printed = runs_table(per_run, ALL_STACKS, BASELINES)
    assert printed.startswith("3 runs, interleaved")
    # the standard error of each per-layer figure: two medians of 4 steps, sigma 1 ms, over 2 added layers
    error = 1.2533 / 2 * 2 ** 0.5 / 2
    assert f"| ours: per layer ms | 25.00 ±{error:.2f} | 26.00 ±{error:.2f} | 25.00 ±{error:.2f} | spread 4.0% |" \
        in printed
    assert "| hf_grouped_mm against ours: per layer | 2.00x | 1.92x | 2.00x | lowest 1.92x |" in printed


def test_one_depth_gives_tokens_per_second_and_its_ratio():
    per_run = [summarise([result("ours", 48, step, run), result("hf_peft_lora", 48, 1000.0, run)], (48,), peak=989.0,
                         frozen_weights=True) for run, step in enumerate((400.0, 500.0))]
    printed = runs_table(per_run, ALL_STACKS, BASELINES)
    assert "| ours: tokens/s | 20480 | 16384 | spread 25.0% |" in printed
    assert "| hf_peft_lora against ours: tokens/s | 2.50x | 2.00x | lowest 2.00x |" in printed
