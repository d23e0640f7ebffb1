"""The chunked loss in training runs on CPU processes: the plain path's losses, gradient norms and eval loss."""
import pytest

from helpers import EVAL, SAMPLE, read_metrics, train_together


def test_a_run_with_the_loss_in_chunks_trains_what_the_plain_loss_trains(tmp_path):
    # fp32, 2048-token micro-batches of the tiny model (vocabulary 2048): two chunks of at most 1024 tokens a step, the
    # second as long as the packing leaves. Both sum the same per-token terms in another order: ~1e-7 relative of
    # the gradients, which Adam's normalised updates carry into the weights at that share of the lr; over 4 steps the
    # losses and norms move by ~1e-6 (bounded at 1e-5), where a chunk lost or counted twice moves them by its share.
    common = ["--data", str(SAMPLE), "--eval-data", str(EVAL), "--max-steps", "4", "--max-tokens-per-batch", "2048",
              "--max-seq-len", "512", "--lr", "1e-3", "--warmup-steps", "0", "--export-hf", "false",
              "--adam-states", "fp32"]  # bf16 moments round stochastically: a 1e-7 difference may flip a rounding
    outputs = train_together([(tmp_path / impl, [*common, "--loss-impl", impl]) for impl in ("torch", "chunked")])
    assert "loss torch |" in outputs[0] and "loss chunked |" in outputs[1]
    plain, chunked = (read_metrics(tmp_path / impl) for impl in ("torch", "chunked"))
    assert len(plain) == len(chunked) == 5  # 4 steps and the evaluation at the end
    for ours, reference in zip(chunked, plain):
        assert (ours.get("num_label_tokens"), ours.get("eval_label_tokens")) == (
            reference.get("num_label_tokens"), reference.get("eval_label_tokens"))
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in reference:
                assert ours[key] == pytest.approx(reference[key], rel=1e-5), (key, ours["step"])
