"""The plot of a run: drawn from metrics.jsonl even when a killed run left its last line torn."""
import json

from qwen_moe_ft.plot import plot, read_metrics


def test_a_torn_last_line_is_left_out_and_the_rest_drawn(tmp_path):
    records = [{"step": s, "loss": 3.0 - 0.1 * s, "tps_per_gpu": 100.0, "tflops_per_gpu": 0.1, "mfu": None}
               for s in range(1, 6)]
    records.append({"step": 5, "eval_loss": 2.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')
    steps, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and evals == records[-1:]
    assert plot(str(tmp_path)).stat().st_size > 1000
