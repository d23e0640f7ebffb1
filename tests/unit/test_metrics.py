import json

from transformers import Qwen3MoeConfig

from qwen_moe_ft.metrics import KEYS, MetricsLogger, StepMetrics, drop_metrics_after, step_metrics

SEED_FIELDS = ["step", "epoch", "loss", "grad_norm", "lr", "mem", "tps", "num_label_tokens"]


def _metrics(**overrides):
    values = dict(step=7, epoch=2, loss=1.25, grad_norm=0.5, lr=1e-4, mem_gib=61.5, tps=8000.0, tps_per_gpu=1000.0,
                  num_label_tokens=4321, tflops_per_gpu=120.0, mfu=0.125, aux_loss=0.008, z_loss=0.0,
                  expert_load_max=1.5, dead_experts=0, data_seconds=0.012, mem_reserved_gib=70.25, alloc_retries=3)
    return StepMetrics(**{**values, **overrides})


def test_line_keeps_the_published_runs_fields_first_in_their_order():
    line = _metrics().line()
    fields = [part.split(" ")[0] for part in line.split(" | ")]
    assert fields[:8] == SEED_FIELDS
    assert line.startswith("step 7 | epoch 2 | loss 1.2500 | grad_norm 0.5000 | lr 1.00e-04 | mem 61.50 GiB | "
                           "tps 8000.00(1000.00/gpu) | num_label_tokens 4321 | ")
    assert fields[8:] == ["tflops", "mfu", "aux_loss", "z_loss", "expert_load_max", "dead_experts", "data",
                          "reserved", "alloc_retries"]
    assert line.endswith("| data 0.012 s | reserved 70.25 GiB | alloc_retries 3")
    assert "| mem n/a |" in _metrics(mem_gib=None).line() and "| mfu n/a |" in _metrics(mfu=None).line()
    assert _metrics(mem_reserved_gib=None, alloc_retries=None).line().endswith("| reserved n/a | alloc_retries n/a")


def test_metrics_jsonl_keys_follow_the_line():
    assert list(KEYS[:9]) == ["step", "epoch", "loss", "grad_norm", "lr", "mem_gib", "tps", "tps_per_gpu",
                              "num_label_tokens"]


def test_throughput_counts_the_time_spent_building_the_batches():
    config = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2)
    metrics = step_metrics(step=1, epoch=1, loss=1.0, grad_norm=1.0, lr=1e-4, seconds=0.75, data_seconds=0.25,
                           tokens=8000, label_tokens=7000, mean_context=10.0, world_size=2, model_config=config,
                           peak_tflops=None, mem_gib=None, aux_loss=0.0, z_loss=0.0, expert_load_max=1.0,
                           dead_experts=0)
    assert (metrics.tps, metrics.tps_per_gpu, metrics.data_seconds) == (8000.0, 4000.0, 0.25)  # 8000 tokens in 1 s
    assert metrics.mfu is None


def test_resume_drops_steps_and_evals_past_the_checkpoint_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7},
               {"step": 3, "loss": 1.2}, {"step": 4, "eval_loss": 1.1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # killed mid-write
    note = drop_metrics_after(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    assert "dropped line(s) [6]" in note
    assert drop_metrics_after(path, 2) is None


def test_the_first_step_whose_allocations_retried_is_told_once_with_what_to_change(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), 10, accelerator=None, enabled=True, progress_bar=False)
    logger.start(0)
    for step, retries in ((1, 0), (2, None), (3, 2), (4, 5)):
        logger.log_step(_metrics(step=step, alloc_retries=retries), log_line=False)
    logger.close()
    told = capsys.readouterr().out.splitlines()
    assert len(told) == 1 and told[0].startswith("warning: step 3: the CUDA caching allocator found no room 2 time(s)")
    assert "--fast-path-skip" in told[0] and "python -m qwen_moe_ft.memory" in told[0]


def test_no_progress_bar_when_stdout_is_not_a_terminal(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), 10, accelerator=None, enabled=True, progress_bar=True)
    logger.start(0)
    logger.info("step 1 | loss 1.0")
    logger.close()
    assert logger.bar is None and capsys.readouterr().out == "step 1 | loss 1.0\n"
