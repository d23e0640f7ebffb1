"""Trainer behaviour across modes, on two CPU processes with real DeepSpeed."""
import pytest

from helpers import SAMPLE, read_metrics, train


def epoch_loss(output_dir):
    steps = [m for m in read_metrics(output_dir) if "eval_loss" not in m]
    tokens = sum(m["num_label_tokens"] for m in steps)
    return sum(m["loss"] * m["num_label_tokens"] for m in steps) / tokens, tokens, len(steps)


def test_packed_and_unpacked_optimise_the_same_objective(tmp_path):
    rows = tmp_path / "rows.jsonl"  # a fifth of the sample: an epoch of each is enough to compare
    rows.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:600]))
    common = ["--data", str(rows), "--epochs", "1", "--lr", "0", "--max-tokens-per-batch", "2048",
              "--max-seq-len", "512", "--export-hf", "false"]
    train(tmp_path / "packed", *common, "--packing", "true")
    train(tmp_path / "unpacked", *common, "--packing", "false")
    packed_loss, packed_tokens, packed_steps = epoch_loss(tmp_path / "packed")
    unpacked_loss, unpacked_tokens, unpacked_steps = epoch_loss(tmp_path / "unpacked")
    assert packed_tokens == unpacked_tokens
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    assert packed_steps < unpacked_steps


def test_bad_option_fails_before_loading_with_its_name(tmp_path):
    proc = train(tmp_path, "--ep-size", "3", check=False)
    assert proc.returncode != 0
    assert "--ep-size 3" in proc.stderr


def test_missing_model_says_how_to_point_at_a_local_copy(tmp_path):
    proc = train(tmp_path, "--model", str(tmp_path / "no-such-model"), nproc=1, check=False)
    assert proc.returncode != 0
    assert "--model DIR" in proc.stderr


def test_two_ranks_train_what_one_rank_accumulating_two_micro_batches_trains(tmp_path):
    """Same micro-batches per step either way: gradients summed over ranks (gradient_allreduce_op "sum")
    and over accumulation steps must give the same update as the loss normalisation intends; the global-scope
    router terms (large coefficients, so they move the weights) counted over the whole step either way."""
    from safetensors.torch import load_file

    common = ["--data", str(SAMPLE), "--max-steps", "3", "--max-tokens-per-batch", "512", "--max-seq-len", "512",
              "--lr", "3e-3", "--warmup-steps", "0", "--seed", "3", "--ep-size", "1",
              "--router-aux-loss-coef", "0.1", "--router-z-loss-coef", "0.01", "--router-aux-scope", "global",
              "--adam-states", "fp32"]  # bf16 moments round with random bits drawn per partition offset
    train(tmp_path / "ranks", *common, "--grad-accum", "1", nproc=2)
    train(tmp_path / "accum", *common, "--grad-accum", "2", nproc=1)
    ranks, accum = read_metrics(tmp_path / "ranks"), read_metrics(tmp_path / "accum")
    assert [m["step"] for m in ranks] == [m["step"] for m in accum] == [1, 2, 3]
    for a, b in zip(ranks, accum):
        assert a["num_label_tokens"] == b["num_label_tokens"]
        assert a["aux_loss"] > 0.05 and a["z_loss"] > 0  # the terms were on (even routing gives 0.1)
        # float32 sums in another order (per rank, per micro-batch): ~1e-7 relative a step, over 3 steps of Adam
        for key in ("loss", "aux_loss", "z_loss", "expert_load_max"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["dead_experts"] == b["dead_experts"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    weights_ranks = load_file(tmp_path / "ranks" / "hf" / "model.safetensors")
    weights_accum = load_file(tmp_path / "accum" / "hf" / "model.safetensors")
    for name in weights_ranks:
        assert (weights_ranks[name] - weights_accum[name]).abs().max() < 1e-5, name
