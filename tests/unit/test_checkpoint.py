from qwen_moe_ft.checkpoint import COMPLETE, complete_checkpoints, prune


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
