import subprocess
import sys

import pytest

from helpers import REPO, cpu_env
from qwen_moe_ft.launch import _status, main


def test_a_process_status_becomes_the_runs_and_a_signal_128_plus_its_number():
    assert [_status(code) for code in (2, 1, -9, -15, 0)] == [2, 1, 137, 143, 1]  # 0: a failure said nothing


def test_only_torchrun_and_accelerate_are_launched():
    with pytest.raises(SystemExit, match=r"torchrun\|accelerate .*got 'deepspeed'"):
        main(["deepspeed", "train.py"])


def test_accelerates_launch_of_a_failing_process_ends_with_its_line_and_status(tmp_path):
    """What run.sh runs on GPUs, here with one CPU process: Accelerate's own launcher would raise
    CalledProcessError over the process's error line."""
    proc = subprocess.run([sys.executable, "-m", "qwen_moe_ft.launch", "accelerate", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "qwen_moe_ft/train.py", "--config", "tiny-packed", "--ep-size", "3", "--output-dir",
                           str(tmp_path)], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: --ep-size 3 does not divide the world size 1" in proc.stderr
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
