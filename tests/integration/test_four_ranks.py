"""Four CPU processes at EP=1, EP=2 and EP=4 train what one process accumulating four micro-batches trains.

Each expert's data-parallel group has 4 / EP ranks: at EP=1 and EP=2 ZeRO reduces expert gradients over several
ranks and the fast path's in-place-gradient and gate/up-cache patches take their several-ranks branches (the
layouts of multi-node runs, e.g. 16 GPUs at EP=8); at EP=4 their one-rank branches. A save at EP=2 is resumed
exactly. Fast path on, fp32 moments (bf16 ones round with random bits drawn per partition offset)."""
import pytest
from safetensors.torch import load_file

from helpers import SAMPLE, TINY, assert_trained_alike, max_rel_err, read_metrics, train, train_until_sigterm
from qwen_moe_ft.checkpoint import COMPLETE

LR, STEPS = 3e-3, 3
RUN = ["--data", str(SAMPLE), "--max-steps", str(STEPS), "--max-tokens-per-batch", "512", "--max-seq-len", "512",
       "--lr", str(LR), "--warmup-steps", "0", "--seed", "3",
       # large router coefficients, so the global-scope terms move the weights
       "--router-aux-loss-coef", "0.1", "--router-z-loss-coef", "0.01", "--router-aux-scope", "global",
       "--adam-states", "fp32"]  # bf16 moments round with random bits drawn per partition offset, which EP changes
EP2 = [*RUN, "--ep-size", "2", "--grad-accum", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same global batches: one micro-batch on each of four ranks, or four accumulated on one."""
    out = {"accum": tmp_path_factory.mktemp("accum4")}
    train(out["accum"], *RUN, "--ep-size", "1", "--grad-accum", "4", nproc=1)
    for ep in (1, 2, 4):
        out[ep] = tmp_path_factory.mktemp(f"ranks4_ep{ep}")
        train(out[ep], *RUN, "--ep-size", str(ep), "--grad-accum", "1", nproc=4)
    return out


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    """The EP=2 run of `runs`, stopped by SIGTERM after one of its steps, then resumed from its checkpoint."""
    out = tmp_path_factory.mktemp("ranks4_ep2_resumed")
    first_output = train_until_sigterm(out, *EP2, after_steps=1, nproc=4)
    stopped_at = len(read_metrics(out))
    second = train(out, *EP2, "--resume", "latest", nproc=4)
    return out, first_output, stopped_at, second.stdout


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_four_ranks_train_what_one_rank_accumulating_four_micro_batches_trains(runs, ep):
    """Gradients summed over ranks (ZeRO's reduce over the dense group and over each expert group) and over
    accumulation steps give the same update; the global-scope router terms are counted over the whole step."""
    ranks, accum = read_metrics(runs[ep]), read_metrics(runs["accum"])
    assert [m["step"] for m in ranks] == [m["step"] for m in accum] == list(range(1, STEPS + 1))
    for a, b in zip(ranks, accum):
        assert a["num_label_tokens"] == b["num_label_tokens"]
        assert a["aux_loss"] > 0.05 and a["z_loss"] > 0  # the terms were on (even routing gives 0.1)
        # float32 sums in another order (per rank, per micro-batch): ~1e-7 relative a step, over 3 steps of Adam
        for key in ("loss", "aux_loss", "z_loss", "expert_load_max"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["dead_experts"] == b["dead_experts"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    weights_ranks = load_file(runs[ep] / "hf" / "model.safetensors")
    start = load_file(TINY / "model.safetensors")
    # four partial gradients are summed in another association by gloo's reduce than by accumulation
    assert_trained_alike(weights_ranks, load_file(runs["accum"] / "hf" / "model.safetensors"), start, STEPS, LR)
    expert = "model.layers.1.mlp.experts.7.down_proj.weight"
    assert (weights_ranks[expert] - start[expert]).abs().max() > 1e-4, "the last EP rank's experts did not train"


def test_ep2_save_with_expert_groups_of_two_ranks_resumes_exactly(runs, interrupted_and_resumed):
    resumed, first_output, stopped_at, second_output = interrupted_and_resumed
    assert 1 <= stopped_at < STEPS, "SIGTERM came after the last step: nothing was resumed"
    assert f"stopped by SIGTERM after step {stopped_at}; continue with --resume latest" in first_output
    checkpoint = resumed / "checkpoints" / f"step-{stopped_at}"
    assert (checkpoint / COMPLETE).exists()
    assert f"resumed from {checkpoint} at step {stopped_at}" in second_output
    straight, again = read_metrics(runs[2]), read_metrics(resumed)
    assert [m["step"] for m in again] == [m["step"] for m in straight]
    # the same arithmetic in the same order: only a lost or stale state (moments, expert shards, the gate/up
    # cache) would move a loss or a weight
    for a, b in zip(straight, again):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
    w1, w2 = (load_file(run / "hf" / "model.safetensors") for run in (runs[2], resumed))
    for name in w1:
        assert max_rel_err(w2[name], w1[name]) < 1e-6, name
