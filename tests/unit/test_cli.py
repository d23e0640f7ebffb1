"""The command line before any process starts: run.sh's check of the options and the data, and `-h` without heavy
imports."""
import subprocess
import sys

from helpers import REPO, TINY, cpu_env
from qwen_moe_ft.cli import check, main


def test_run_sh_typo_is_one_line_with_a_suggestion_and_no_process_started():
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "packed", "--learning-rate", "1"], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown option --learning-rate; did you mean --lr?"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # run.sh's launch line never printed
    # the check answers before anything heavy is imported
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qwen_moe_ft.cli", "--learning-rate", "1"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=60)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert proc.returncode == 2 and not imported & {"torch", "deepspeed", "transformers", "datasets"}


def test_run_sh_takes_options_alone_as_the_packed_mode_and_names_the_modes_otherwise():
    def run_sh(*args):
        return subprocess.run(["bash", str(REPO / "run.sh"), *args], cwd=REPO, env=cpu_env(), capture_output=True,
                              text=True, timeout=60)

    proc = run_sh("--learning-rate", "1")  # checked as `run.sh packed --learning-rate 1` is, so nothing launched
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown option --learning-rate; did you mean --lr?"]
    proc = run_sh("pakced")
    assert proc.returncode == 2
    assert "unknown mode 'pakced'; use packed, unpacked or lora (before any --option)" in proc.stderr


def test_check_passes_a_good_command_line_and_refuses_an_earlier_run(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--lr", "1e-3"]) == 0
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["--output-dir", str(tmp_path)]) == 2
    assert "--overwrite-output-dir true" in capsys.readouterr().err


def test_check_reads_the_data_as_the_trainer_does(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{not json\n')
    run = ["--model", str(TINY), "--output-dir", str(tmp_path / "out")]
    assert check(["--data", str(rows), *run]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {rows}: 1 bad row(s) ({{'bad_json': 1}}), first:\n  row 2: bad_json")
    assert check(["--data", str(rows), "--on-bad-row", "skip", *run]) == 0
    assert check(["--data", str(tmp_path / "none.jsonl"), *run]) == 2
    assert "none.jsonl: no such file or directory" in capsys.readouterr().err


def test_check_refuses_parallel_sizes_the_process_count_cannot_take(tmp_path, capsys, monkeypatch):
    """run.sh sets WORLD_SIZE to the processes it will start; the tiny model has 8 experts and 4 attention heads."""
    run = ["--model", str(TINY), "--output-dir", str(tmp_path / "out")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check([*run, "--ep-size", "3"]) == 2
    assert "error: --ep-size 3 does not divide the world size 2 (number of processes)" in capsys.readouterr().err
    assert check([*run, "--sp-size", "4"]) == 2
    assert "error: --sp-size 4 does not divide the world size 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert check([*run, "--ep-size", "16"]) == 2
    assert "--ep-size 16 does not divide the model's 8 experts" in capsys.readouterr().err
    assert check([*run, "--ep-size", "8"]) == 0


def test_errors_are_printed_by_rank_0_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["--lr", "fast"]) == 2
    assert capsys.readouterr().err == ""


def test_help_lists_options_in_groups_without_importing_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qwen_moe_ft.train", "-h"], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "deepspeed", "transformers", "accelerate", "datasets"}
    help_text = " ".join(proc.stdout.split())  # argparse wraps lines at the terminal's width
    for expected in ("model:", "data:", "optimisation:", "parallelism:", "checkpoints:", "LoRA:",
                     "--lr FLOAT peak learning rate (default 0.0001)",
                     "(default drop; one of drop, truncate)", "--overwrite-output-dir [BOOL]"):
        assert expected in help_text, expected
