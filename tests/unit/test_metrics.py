import json

from qwen_moe_ft.metrics import MetricsLogger, drop_metrics_after


def test_resume_drops_steps_and_evals_past_the_checkpoint_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7},
               {"step": 3, "loss": 1.2}, {"step": 4, "eval_loss": 1.1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # killed mid-write
    note = drop_metrics_after(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    assert "dropped line(s) [6]" in note
    assert drop_metrics_after(path, 2) is None


def test_no_progress_bar_when_stdout_is_not_a_terminal(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), 10, accelerator=None, enabled=True, progress_bar=True)
    logger.start(0)
    logger.info("step 1 | loss 1.0")
    logger.close()
    assert logger.bar is None and capsys.readouterr().out == "step 1 | loss 1.0\n"
