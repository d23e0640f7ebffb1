"""Checkpoints: SIGTERM saves and stops, --resume continues exactly (four processes at EP=2, the runs of
conftest.py), a checkpoint of another layout or data order is refused before loading, an interrupted save is never
the one resumed from, and a resumed run saves over the step `latest` names."""
import shutil

import pytest
from safetensors.torch import load_file

from helpers import FOUR_RANK_RUN, FOUR_RANK_STEPS, max_rel_err, read_metrics, train
from qwen_moe_ft.checkpoint import COMPLETE, CheckpointError, complete_checkpoints, resolve


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(four_rank_ep2_resumed):
    resumed, output, stopped_at, _ = four_rank_ep2_resumed
    assert 1 <= stopped_at < FOUR_RANK_STEPS, "SIGTERM came after the last step: nothing was resumed"
    assert f"stopped by SIGTERM after step {stopped_at}; continue with --resume latest" in output
    assert (resumed / "checkpoints" / f"step-{stopped_at}" / COMPLETE).exists()


def test_resumed_run_continues_exactly_with_expert_groups_of_two_ranks(four_rank_runs, four_rank_ep2_resumed):
    """Four processes at EP=2, two micro-batches each a step: moments, expert shards, the gate/up cache, the data
    position within the epoch and the schedule all come back."""
    resumed, _, stopped_at, second_output = four_rank_ep2_resumed
    assert f"resumed from {resumed / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in second_output
    straight, again = read_metrics(four_rank_runs[2]), read_metrics(resumed)
    assert [m["step"] for m in again] == [m["step"] for m in straight] == list(range(1, FOUR_RANK_STEPS + 1))
    # the same arithmetic in the same order: only a lost or stale state would move a loss or a weight
    for a, b in zip(straight, again):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    w1, w2 = (load_file(run / "hf" / "model.safetensors") for run in (four_rank_runs[2], resumed))
    for name in w1:
        assert max_rel_err(w2[name], w1[name]) < 1e-6, name


def test_resuming_with_another_number_of_processes_stops_before_loading(four_rank_ep2_resumed, tmp_path):
    resumed, _, stopped_at, _ = four_rank_ep2_resumed
    proc = train(tmp_path, *FOUR_RANK_RUN, "--ep-size", "1", "--resume",
                 str(resumed / "checkpoints" / f"step-{stopped_at}"), nproc=1, check=False)
    assert proc.returncode != 0
    assert "was saved by 4 process(es) at EP=2 (full fine-tuning); this run has 1 process(es) at EP=1" in proc.stderr
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


def test_save_total_limit_keeps_the_newest(four_rank_runs):
    """The one-process run of conftest.py saved after each of its 3 steps with --save-total-limit 2."""
    root = four_rank_runs["accum"] / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-2", "step-3"]
    assert (root / "latest").read_text().strip() == "step-3"


def accum_run(grad_accum: int) -> list[str]:
    """The options of conftest.py's one-process run (grad_accum 8), saving a checkpoint after each step."""
    return [*FOUR_RANK_RUN, "--ep-size", "1", "--grad-accum", str(grad_accum), "--save-steps", "1",
            "--save-total-limit", "2"]


def test_resuming_with_another_grad_accum_stops_before_loading_naming_it(four_rank_runs, tmp_path):
    step = four_rank_runs["accum"] / "checkpoints" / "step-3"
    proc = train(tmp_path, *accum_run(4), "--resume", str(step), nproc=1, check=False)
    assert proc.returncode != 0
    assert ("--grad-accum was 8 when step-3 was saved, now 4: its steps would train other examples. Resume with "
            "--grad-accum 8, or start a new run") in proc.stderr
    assert "resumed from" not in proc.stdout and "load_checkpoint" not in proc.stderr


def test_a_run_resumed_from_an_earlier_step_saves_over_the_step_latest_names(four_rank_runs, tmp_path):
    """Resumed from step-2, the run saves step 3 again while `latest` names the first run's step-3."""
    run = tmp_path / "run"
    shutil.copytree(four_rank_runs["accum"], run)
    root = run / "checkpoints"
    proc = train(run, *accum_run(8), "--resume", str(root / "step-2"), nproc=1)
    assert f"resumed from {root / 'step-2'} at step 2" in proc.stdout
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-2", "step-3"]  # beside DeepSpeed's scripts
    assert resolve("latest", root) == root / "step-3"
    first, again = read_metrics(four_rank_runs["accum"]), read_metrics(run)
    assert [m["step"] for m in again] == [1, 2, 3]
    assert again[-1]["loss"] == pytest.approx(first[-1]["loss"], rel=1e-6)
