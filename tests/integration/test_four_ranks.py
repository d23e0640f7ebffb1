"""Four CPU processes at EP=1, EP=2 and EP=4 train what one process accumulating all their micro-batches trains.

Each expert's data-parallel group has 4 / EP ranks: at EP=1 and EP=2 ZeRO reduces expert gradients over several
ranks and the fast path's in-place-gradient and gate/up-cache patches take their several-ranks branches (the
layouts of multi-node runs, e.g. 16 GPUs at EP=8); at EP=4 their one-rank branches. Each rank accumulates two
micro-batches. Fast path on, fp32 moments. The runs (conftest.py) also give test_checkpoint.py its EP=2 resume."""
import pytest
from safetensors.torch import load_file

from helpers import FOUR_RANK_LR, FOUR_RANK_STEPS, TINY, assert_trained_alike, read_metrics


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_four_ranks_train_what_one_rank_accumulating_their_micro_batches_trains(four_rank_runs, ep):
    """Gradients summed over ranks (ZeRO's reduce over the dense group and over each expert group) and over
    accumulation steps give the same update; the global-scope router terms are counted over the whole step."""
    runs = four_rank_runs
    ranks, accum = read_metrics(runs[ep]), read_metrics(runs["accum"])
    assert [m["step"] for m in ranks] == [m["step"] for m in accum] == list(range(1, FOUR_RANK_STEPS + 1))
    for a, b in zip(ranks, accum):
        assert a["num_label_tokens"] == b["num_label_tokens"]
        assert a["aux_loss"] > 0.1 and a["z_loss"] > 0  # the terms were on (even routing gives 0.1 x top-2)
        # float32 sums in another order (per rank, per micro-batch): ~1e-7 relative a step, over 3 steps of Adam
        for key in ("loss", "aux_loss", "z_loss", "expert_load_max"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["dead_experts"] == b["dead_experts"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    weights_ranks = load_file(runs[ep] / "hf" / "model.safetensors")
    start = load_file(TINY / "model.safetensors")
    # eight partial gradients are summed in another association by gloo's reduce than by accumulation
    assert_trained_alike(weights_ranks, load_file(runs["accum"] / "hf" / "model.safetensors"), start,
                         FOUR_RANK_STEPS, FOUR_RANK_LR)
    expert = "model.layers.1.mlp.experts.7.down_proj.weight"
    assert (weights_ranks[expert] - start[expert]).abs().max() > 1e-4, "the last EP rank's experts did not train"
