import json

import pytest

from qwen_moe_ft.checkpoint import (COMPLETE, CheckpointError, Layout, check_layout, complete_checkpoints, prune,
                                   saved_layout)


def finished(root, *steps):
    for step in steps:
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / COMPLETE).write_text(str(step))


def test_prune_keeps_the_newest(tmp_path):
    finished(tmp_path, 2, 4, 6)
    (tmp_path / "step-5").mkdir()  # half-written
    prune(tmp_path, 2, latest=tmp_path / "step-6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]


def test_prune_never_removes_what_latest_names(tmp_path):
    """A run resumed from step-100 saves step-110 beside an older run's step-200 and step-210."""
    finished(tmp_path, 100, 110, 200, 210)
    prune(tmp_path, 2, latest=tmp_path / "step-110")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-110", "step-210"]
    prune(tmp_path, 1, latest=tmp_path / "step-110")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-110"]


def test_keep_zero_keeps_all(tmp_path):
    finished(tmp_path, 1, 2, 3)
    prune(tmp_path, 0, latest=tmp_path / "step-3")
    assert len(complete_checkpoints(tmp_path)) == 3


def test_a_checkpoint_of_another_layout_is_refused_saying_how_to_resume_it(tmp_path):
    step = tmp_path / "step-4"
    step.mkdir()
    saved = Layout(processes=2, ep_size=2, lora=False)
    (step / COMPLETE).write_text(json.dumps({"step": 4, "layout": saved._asdict()}))
    assert saved_layout(step) == saved
    check_layout(step, saved)  # the same layout resumes
    with pytest.raises(CheckpointError, match=r"saved by 2 process\(es\) at EP=2 \(full fine-tuning\); this run has "
                                              r"1 process\(es\) at EP=1.*NUM_PROCESSES=2.*--ep-size 2"):
        check_layout(step, Layout(processes=1, ep_size=1, lora=False))
    (step / COMPLETE).write_text("4\n")  # a marker from before layouts were recorded: nothing to check against
    check_layout(step, Layout(processes=1, ep_size=1, lora=False))
