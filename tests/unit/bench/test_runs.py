"""`bench --runs N`: each run summarised on its own, set side by side with the runs' spread and the lowest ratio."""
import pytest

from qwen_moe_ft.bench.benchmark import ALL_STACKS, BASELINES, summarise
from qwen_moe_ft.bench.runs import runs_table, spread


def result(stack, depth, step_ms, run):
    return dict(stack=stack, depth=depth, attention="x", step_ms=step_ms, step_ms_spread=1.349,
                fwd_bwd_ms=0.9 * step_ms, optimizer_ms=0.1 * step_ms, head_loss_ms=10.0, peak_mem_gib=40.0,
                peak_reserved_gib=44.0, reserved_by_stream={"current (the step's)": dict(reserved_gib=44.0)},
                tokens=8192, mean_context=461.0, losses=[12.3], steps_ms=[step_ms] * 4, run=run)


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


def _main_with_canned_workers(monkeypatch, tmp_path, answer, args) -> dict:
    """bench's main() with each worker's subprocess answered by `answer(stack, depth, call)` (call counted from 1):
    a step time in ms, or an error line for a failed worker (the workers need a GPU); returns the written report."""
    import json
    import subprocess
    from types import SimpleNamespace

    import qwen_moe_ft.bench.benchmark as benchmark

    calls = []

    def worker(cmd, **kwargs):
        stack, depth = cmd[cmd.index("--worker") + 1], int(cmd[cmd.index("--worker") + 2])
        calls.append((stack, depth))
        step_ms = answer(stack, depth, len(calls))
        if isinstance(step_ms, str):
            return SimpleNamespace(returncode=1, stdout="", stderr=step_ms)
        out = dict(result(stack, depth, step_ms, 0), gpu="NVIDIA H100 80GB HBM3")
        del out["run"]  # the worker does not know its run
        return SimpleNamespace(returncode=0, stdout="RESULT " + json.dumps(out), stderr="")

    monkeypatch.setattr(benchmark, "require_cuda", lambda tool: None)
    monkeypatch.setattr(subprocess, "run", worker)
    monkeypatch.setattr(benchmark, "write_report", lambda path, **report: (tmp_path / "report.json").write_text(
        json.dumps(report)))
    assert benchmark.main(["--full-length", *args, "--steps", "4"]) == 0
    return dict(json.loads((tmp_path / "report.json").read_text()), calls=calls)


def test_main_interleaves_the_runs_and_reports_each(monkeypatch, tmp_path, capsys):
    """The orchestration of `--runs 2`: the order of the workers, a failed worker named with its run, the report's
    runs."""
    step = {("ours", 2): 110.0, ("ours", 4): 160.0, ("hf_grouped_mm", 2): 200.0, ("hf_grouped_mm", 4): 300.0}

    def answer(stack, depth, call):  # the last worker of run 2 fails
        return "torch.OutOfMemoryError: CUDA out of memory" if call == 8 else step[stack, depth] + call / 10

    report = _main_with_canned_workers(monkeypatch, tmp_path, answer,
                                       ["--stacks", "ours,hf_grouped_mm", "--runs", "2"])
    assert report["calls"] == [("ours", 2), ("ours", 4), ("hf_grouped_mm", 2), ("hf_grouped_mm", 4)] * 2
    assert [r["run"] for r in report["results"]] == [0, 0, 0, 0, 1, 1, 1]
    assert report["failures"] == [dict(stack="hf_grouped_mm", depth=4, run=1,
                                       error="torch.OutOfMemoryError: CUDA out of memory")]
    assert len(report["runs"]) == 2 and "hf_grouped_mm" not in report["runs"][1]  # run 2 lacks its 4-layer step
    assert report["summary"] == report["runs"][0]
    printed = capsys.readouterr().out
    assert "hf_grouped_mm at 4 layers, run 2 failed: torch.OutOfMemoryError" in printed
    # (160.2 - 110.1) / 2 and (160.6 - 110.5) / 2; no ratio row, as run 2 has no transformers figure
    assert "| ours: per layer ms | 25.05 ±0.44 | 25.05 ±0.44 | spread 0.0% |" in printed
    assert "against ours" not in printed.split("2 runs, interleaved")[1]
    assert report["run_numbers"] == [1, 2]


@pytest.mark.parametrize("failed_run", [1, 2])
def test_a_run_in_which_nothing_ran_at_every_depth_keeps_the_others_numbered(monkeypatch, tmp_path, capsys,
                                                                              failed_run):
    """Run 1 failing too: the report's summary is then the first run that did run."""
    def answer(stack, depth, call):  # both depths of the failed run fail
        if (call + 1) // 2 == failed_run:
            return "RuntimeError: CUDA error: unspecified launch failure"
        return 110.0 if depth == 2 else 160.0 + call

    report = _main_with_canned_workers(monkeypatch, tmp_path, answer, ["--stacks", "ours", "--runs", "3"])
    kept = [run for run in (1, 2, 3) if run != failed_run]
    assert report["run_numbers"] == kept and len(report["runs"]) == 2
    assert report["summary"] == report["runs"][0]
    printed = capsys.readouterr().out
    assert f"|  | run {kept[0]} | run {kept[1]} |  |" in printed  # the header names the runs that ran
    # per layer (160 + 2k - 110) / 2 for the 4-layer worker of run k, the call 2k
    cells = " | ".join(f"{(50 + 2 * k) / 2:.2f} ±0.44" for k in kept)
    assert f"| ours: per layer ms | {cells} | spread" in printed
    assert f"ours at 2 layers, run {failed_run} failed: RuntimeError: CUDA error" in printed
