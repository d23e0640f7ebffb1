"""train.main's handling of a run that fails (out of GPU memory is a message that says what to change), what
a training step's time takes in, and that the trainer imports none of tools/."""
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from helpers import REPO, cpu_env
from qwen_moe_ft import train


def test_out_of_memory_says_what_lowers_the_peak(monkeypatch, capsys):
    def runs_out(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "Trainer", runs_out)
    assert train.main(["--model", "data/tiny-qwen3-moe"]) == 1
    err = capsys.readouterr().err
    assert "Tried to allocate 2.00 GiB" in err  # the traceback stays
    assert err.rstrip().endswith(f"error: {train.OUT_OF_MEMORY}")
    assert "--checkpoint-layers N" in err and "python -m qwen_moe_ft.memory" in err


def test_a_steps_time_takes_in_building_its_batches():
    class SlowLoader:
        def step(self, step):
            time.sleep(0.05)
            return SimpleNamespace(micro_batches=["batch"], epoch=2)

    def run_step(micro_batches, **kwargs):
        return micro_batches, kwargs

    trainer = SimpleNamespace(train_loader=SlowLoader(), run_step=run_step)
    micro_batches, kwargs = train.Trainer.train_step(trainer, 6)
    assert micro_batches == ["batch"] and (kwargs["step"], kwargs["epoch"]) == (7, 2)
    assert kwargs["data_seconds"] >= 0.05


def test_the_trainer_imports_no_tool():
    code = ("import sys, qwen_moe_ft.train, qwen_moe_ft.memory; "
            "print(sorted(m for m in sys.modules if m.startswith('qwen_moe_ft.tools')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
