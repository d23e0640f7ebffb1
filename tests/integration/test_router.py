"""The router terms in real training runs on CPU processes: --freeze-router leaves the gates untouched; the loss
balances the experts' load; bad values stop the run before loading. That the global-scope loss is the same at
any EP size, rank count or accumulation is checked on the runs of test_reference.py (EP=1 and EP=2 against a
plain loop) and test_four_ranks.py (4 ranks at EP=1, 2 and 4 against 1 rank accumulating 4, with large coefficients)."""
import pytest
from safetensors.torch import load_file

from helpers import SAMPLE, TINY, read_metrics, train, train_together

ROUTER = ["--router-aux-loss-coef", "0.1", "--router-z-loss-coef", "0.01", "--router-aux-scope", "global"]
STEPS = ["--data", str(SAMPLE), "--max-steps", "3", "--max-tokens-per-batch", "512", "--max-seq-len", "512",
         "--lr", "3e-3", "--warmup-steps", "0", "--seed", "5",
         "--adam-states", "fp32"]  # bf16 moments round with random bits drawn per partition offset


def test_freeze_router_keeps_the_gates_bit_identical(tmp_path):
    train(tmp_path, *STEPS, *ROUTER, "--max-steps", "2", "--freeze-router", "true", nproc=1)
    start, trained = load_file(TINY / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    gates = [name for name in start if name.endswith("mlp.gate.weight")]
    assert len(gates) == 2
    for name in gates:
        assert (trained[name] == start[name]).all(), name
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"):
        assert (trained[name] - start[name]).abs().max() > 1e-4, name


@pytest.mark.slow
def test_load_balancing_loss_lowers_the_busiest_experts_load(tmp_path):
    """200 small steps: with coefficient 0.1 the busiest expert's load over the last 50 steps falls well below the
    run without it (measured ~2.2 against ~3.5 times the mean) and below its own first 25 steps (~3.5)."""
    common = ["--data", str(SAMPLE), "--max-steps", "200", "--max-tokens-per-batch", "256", "--max-seq-len", "256",
              "--lr", "3e-3", "--lr-schedule", "constant", "--export-hf", "false"]
    train_together([(tmp_path / coef, [*common, "--router-aux-loss-coef", coef]) for coef in ("0", "0.1")])
    load = {coef: [m["expert_load_max"] for m in read_metrics(tmp_path / coef)] for coef in ("0", "0.1")}
    late = {coef: sum(values[-50:]) / 50 for coef, values in load.items()}
    assert late["0.1"] < 0.8 * late["0"]
    assert late["0.1"] < 0.8 * sum(load["0.1"][:25]) / 25

    from qwen_moe_ft.plot import plot

    assert plot(str(tmp_path / "0.1")).is_file()  # with the expert-load heatmap of expert_load.jsonl


def test_a_bad_router_value_stops_the_run_before_loading(tmp_path):
    """One through the launcher; every bad value: tests/unit/test_router.py."""
    proc = train(tmp_path, "--model", str(tmp_path / "no-such-model"), "--router-aux-scope", "batch", nproc=1,
                 check=False)
    assert proc.returncode != 0
    assert "--router-aux-scope" in proc.stderr and "no-such-model" not in proc.stderr
