"""What a run reports: metrics.jsonl and, with --report-to, the same numbers in TensorBoard."""
import importlib.util

import pytest

from helpers import read_metrics
from qwen_moe_ft.config import ConfigError, TrainConfig


def test_tensorboard_gets_the_numbers_of_metrics_jsonl(exported_run):
    """The run of conftest.py (two processes, 5 steps, evaluated every 2) with --report-to tensorboard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(exported_run / "qwen_moe_ft")).Reload()  # Accelerate's run directory
    logged = {tag: {e.step: e.value for e in board.Scalars(tag)} for tag in board.Tags()["scalars"]}
    records = read_metrics(exported_run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm", "lr", "tps_per_gpu", "num_label_tokens"):
        assert logged[key] == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in steps}, key
    assert logged["eval_loss"] == {r["step"]: pytest.approx(r["eval_loss"], rel=1e-6)
                                   for r in records if "eval_loss" in r}


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_report_to_a_tracker_that_is_not_installed_says_what_to_install(tracker):
    if importlib.util.find_spec(tracker):
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(ConfigError, match=r"--report-to: .* is not installed .*pip install"):
        TrainConfig.from_flat(report_to=tracker).validate()
