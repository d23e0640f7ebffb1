"""`bash run.sh packed|unpacked` on a machine without GPU: the tiny model on two CPU processes."""
import math
import subprocess

import pytest

from helpers import REPO, cpu_env, read_metrics
from qwen_moe_ft.metrics import KEYS


def run_sh(mode, output_dir, *args):
    proc = subprocess.run(["bash", str(REPO / "run.sh"), mode, "--output-dir", str(output_dir),
                           "--progress-bar", "false", *args],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    # the recipe's 210 steps (3 epochs) add two minutes and no check: the loss falls most in its first 30
    return out, run_sh("packed", out, "--max-steps", "30", "--eval-steps", "15")


def test_packed_run_logs_every_key_and_the_loss_falls(packed):
    out, stdout = packed
    steps = [m for m in read_metrics(out) if "eval_loss" not in m]
    assert [m["step"] for m in steps] == list(range(1, 31))
    for record in steps:
        assert set(record) == set(KEYS)
        for key in KEYS:
            if key in ("mem_gib", "mfu", "mem_reserved_gib", "alloc_retries"):
                assert record[key] is None, "no GPU: memory and MFU are n/a, never made up"
            else:
                assert math.isfinite(record[key]), (key, record)
    first = sum(m["loss"] for m in steps[:10]) / 10
    last = sum(m["loss"] for m in steps[-10:]) / 10
    assert last < first - 1.0, (first, last)
    evals = [m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m]
    assert evals[-1] < evals[0]
    assert "| mfu n/a" in stdout and "packing efficiency" in stdout
    assert (out / "hf" / "model.safetensors").is_file()


def test_plot_draws_the_run(packed):
    from qwen_moe_ft.plot import main

    out, _ = packed
    assert main([str(out)]) == 0
    assert (out / "metrics.png").stat().st_size > 10_000


def test_unpacked_run_needs_more_steps_per_epoch(packed, tmp_path):
    out, stdout = packed
    unpacked = run_sh("unpacked", tmp_path, "--max-steps", "2", "--export-hf", "false")  # the start line says it
    # "N steps per epoch", or "N-M" where epochs plan to different lengths: the fewest
    steps_of = lambda text: int(text.split(" steps per epoch")[0].rsplit("| ", 1)[1].split("-")[0])
    assert steps_of(unpacked) > steps_of(stdout)
    assert "padding efficiency" in unpacked


def test_lora_run_leaves_an_adapter_peft_loads(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import TINY

    stdout = run_sh("lora", tmp_path, "--max-steps", "5")
    assert "LoRA on attn,experts" in stdout and "saved" in stdout
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
                                      tmp_path / "adapter")
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_a_bad_row_is_one_message_before_the_launcher_starts(tmp_path):
    from helpers import SAMPLE

    rows = SAMPLE.read_text().splitlines(keepends=True)[:20]
    rows[9] = "{not json\n"
    (tmp_path / "rows.jsonl").write_text("".join(rows))
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "packed", "--data", str(tmp_path / "rows.jsonl"),
                           "--output-dir", str(tmp_path / "out")],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""  # run.sh's launch line never printed: no process started
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'rows.jsonl'}: 1 bad row(s) ({{'bad_json': 1}}), first:",
        "  row 10: bad_json: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "Fix them, or pass --on-bad-row skip to skip and count them."]


def test_an_error_a_training_process_reports_ends_the_run_without_the_launchers_traceback(tmp_path):
    """--attn flash_attn passes the check before launch (the attention backends are the trainer's to resolve) and
    stops both processes on a machine without flash-attn: their error line is the run's last word, with their exit
    status, not torchrun's ChildFailedError report."""
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "packed", "--attn", "flash_attn", "--output-dir",
                           str(tmp_path)], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "run.sh: packed, 2 process(es)" in proc.stdout  # launched
    assert "error: --attn flash_attn: not available on this machine (cpu)" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
