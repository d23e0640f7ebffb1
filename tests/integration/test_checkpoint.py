"""Checkpoints: SIGTERM saves and stops, --resume continues on the same loss curve (EP=2), and
an interrupted save is never the one resumed from."""
import pytest

from helpers import SAMPLE, read_metrics, train, train_until_sigterm
from qwen_moe_ft.checkpoint import COMPLETE, CheckpointError, complete_checkpoints, resolve

STEPS = 12  # the SIGTERM lands after step 3, and the run stops at the end of the step it is in
RUN = ["--data", str(SAMPLE), "--max-steps", str(STEPS), "--grad-accum", "2", "--max-tokens-per-batch", "2048",
       "--max-seq-len", "512", "--export-hf", "false", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    train(straight, *RUN)
    resumed = tmp_path_factory.mktemp("resumed")
    first_output = train_until_sigterm(resumed, *RUN, after_steps=3)
    stopped_at = len(read_metrics(resumed))
    second = train(resumed, *RUN, "--resume", "latest")
    return straight, resumed, first_output, stopped_at, second.stdout


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(interrupted_and_resumed):
    _, resumed, output, stopped_at, _ = interrupted_and_resumed
    assert 3 <= stopped_at < STEPS
    assert f"stopped by SIGTERM after step {stopped_at}; continue with --resume latest" in output
    assert (resumed / "checkpoints" / f"step-{stopped_at}" / COMPLETE).exists()


def test_resumed_run_follows_the_uninterrupted_loss_curve(interrupted_and_resumed):
    straight, resumed, _, stopped_at, second_output = interrupted_and_resumed
    assert "resumed from" in second_output and f"at step {stopped_at}" in second_output
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), x["step"]
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)


def test_resuming_with_another_number_of_processes_stops_before_loading(interrupted_and_resumed):
    _, resumed, _, _, _ = interrupted_and_resumed
    proc = train(resumed, *RUN, "--resume", "latest", nproc=1, check=False)
    assert proc.returncode != 0
    assert "was saved by 2 process(es) at EP=2 (full fine-tuning); this run has 1 process(es) at EP=1" in proc.stderr
    # stopped by our check, not inside DeepSpeed's loader (torchrun adds its own ChildFailedError summary)
    assert "load_checkpoint" not in proc.stderr and "ZeRORuntimeException" not in proc.stderr


def test_interrupted_save_is_never_resumed_from(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        (root / f"step-{step}").mkdir(parents=True)
        if complete:
            (root / f"step-{step}" / COMPLETE).write_text(str(step))
    (root / "latest").write_text("step-20\n")
    assert [p.name for p in complete_checkpoints(root)] == ["step-10", "step-20"]
    assert resolve("latest", root).name == "step-20"
    with pytest.raises(CheckpointError, match="not a finished checkpoint"):
        resolve(str(root / "step-30"), root)
    with pytest.raises(CheckpointError, match="--save-steps"):
        resolve("latest", tmp_path / "nothing")


def test_save_total_limit_keeps_the_newest(tmp_path):
    train(tmp_path, *RUN[:2], "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "2",
          "--max-tokens-per-batch", "1024", "--max-seq-len", "512", "--export-hf", "false")
    root = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-4", "step-6"]
    assert (root / "latest").read_text().strip() == "step-6"
