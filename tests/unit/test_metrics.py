import json

from qwen_moe_ft.metrics import KEYS, MetricsLogger, StepMetrics, drop_metrics_after

SEED_FIELDS = ["step", "epoch", "loss", "grad_norm", "lr", "mem", "tps", "num_label_tokens"]


def _metrics(**overrides):
    values = dict(step=7, epoch=2, loss=1.25, grad_norm=0.5, lr=1e-4, mem_gib=61.5, tps=8000.0, tps_per_gpu=1000.0,
                  num_label_tokens=4321, tflops_per_gpu=120.0, mfu=0.125, aux_loss=0.008, z_loss=0.0,
                  expert_load_max=1.5, dead_experts=0)
    return StepMetrics(**{**values, **overrides})


def test_line_keeps_the_published_runs_fields_first_in_their_order():
    line = _metrics().line()
    fields = [part.split(" ")[0] for part in line.split(" | ")]
    assert fields[:8] == SEED_FIELDS
    assert line.startswith("step 7 | epoch 2 | loss 1.2500 | grad_norm 0.5000 | lr 1.00e-04 | mem 61.50 GiB | "
                           "tps 8000.00(1000.00/gpu) | num_label_tokens 4321 | ")
    assert fields[8:] == ["tflops", "mfu", "aux_loss", "z_loss", "expert_load_max", "dead_experts"]
    assert "| mem n/a |" in _metrics(mem_gib=None).line() and "| mfu n/a |" in _metrics(mfu=None).line()


def test_metrics_jsonl_keys_follow_the_line():
    assert list(KEYS[:9]) == ["step", "epoch", "loss", "grad_norm", "lr", "mem_gib", "tps", "tps_per_gpu",
                              "num_label_tokens"]


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
