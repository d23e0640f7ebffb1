"""EP=2 over two processes must train exactly what EP=1 (one process accumulating the same two micro-batches)
trains, and the fast path what stock DeepSpeed ZeRO-2 + AutoEP trains (`--fast-path off`, no patch imported), at
both EP sizes: same losses, same weights."""
import json

import pytest
from safetensors.torch import load_file

from helpers import SAMPLE, TINY, assert_trained_alike, max_rel_err, read_metrics, train_together

LR, N_STEPS = 3e-3, 4
STEPS = ["--data", str(SAMPLE), "--max-steps", str(N_STEPS), "--max-tokens-per-batch", "512", "--max-seq-len", "512",
         "--lr", str(LR), "--warmup-steps", "0", "--seed", "7",
         # bf16 moments are rounded with random bits drawn per partition offset, which EP changes
         "--adam-states", "fp32"]


def _run(ep: int) -> list[str]:
    """EP=1 on one process accumulating the two micro-batches that EP=2's two processes run a step."""
    return [*STEPS, "--ep-size", str(ep), "--grad-accum", str(3 - ep)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"fast" | "stock": {ep: output dir}}; the fast and stock runs of one EP size side by side."""
    out = {kind: {ep: tmp_path_factory.mktemp(f"{kind}_ep{ep}") for ep in (1, 2)} for kind in ("fast", "stock")}
    for ep in (1, 2):
        _, stock_output = train_together([(out["fast"][ep], _run(ep)),
                                          (out["stock"][ep], [*_run(ep), "--fast-path", "off"])], nproc=ep)
        assert "fast path off (--fast-path off)" in stock_output
    return out


@pytest.mark.parametrize("ep", [1, 2])
def test_fast_path_trains_what_stock_deepspeed_trains(runs, ep):
    """The same arithmetic in another order (fp32 norm instead of fp64, one-pass AdamW instead of torch's
    fused one): equal to float32 rounding, ~1e-7 relative a step, compounded over 4 steps of Adam."""
    ours, stock = read_metrics(runs["fast"][ep]), read_metrics(runs["stock"][ep])
    assert [m["step"] for m in ours] == [m["step"] for m in stock] == [1, 2, 3, 4]
    for a, b in zip(ours, stock):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    weights_ours = load_file(runs["fast"][ep] / "hf" / "model.safetensors")
    weights_stock = load_file(runs["stock"][ep] / "hf" / "model.safetensors")
    for name, weight in weights_stock.items():
        if name == "model.embed_tokens.weight":
            # A token's row sums its gradient over its occurrences (and, with the default load-balancing loss, over
            # the router terms'); where they nearly cancel, Adam's normalised update turns their rounding into up to
            # ~1e-4 of the 4 x lr a weight can move (measured): bounded at 1e-3 of it.
            assert (weights_ours[name] - weight).abs().max() < 1e-3 * N_STEPS * LR, name
        else:
            assert max_rel_err(weights_ours[name], weight) < 1e-5, name


def test_losses_match(runs):
    ep1, ep2 = (read_metrics(runs["fast"][ep]) for ep in (1, 2))
    assert [m["step"] for m in ep1] == [1, 2, 3, 4]
    for a, b in zip(ep1, ep2):
        assert a["num_label_tokens"] == b["num_label_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # the default load-balancing loss (the model config's coefficient), counted over both ranks' tokens
        assert a["aux_loss"] > 0 and a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5)
        assert a["expert_load_max"] == pytest.approx(b["expert_load_max"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_expert_load_rows_sum_to_the_routed_slots(runs):
    """Every layer routes each real token to its top-k experts: the last step's rows hold one total."""
    rows = [json.loads(line) for line in (runs["fast"][2] / "expert_load.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["step"] == 4]
    assert [r["layer"] for r in last] == [0, 1] and all(len(r["tokens"]) == 8 for r in last)
    assert len({sum(r["tokens"]) for r in last}) == 1 and sum(last[0]["tokens"]) > 0


def test_updated_weights_match_and_moved(runs):
    ep1, ep2 = (load_file(runs["fast"][ep] / "hf" / "model.safetensors") for ep in (1, 2))
    start = load_file(TINY / "model.safetensors")
    # each expert's gradient is one GEMM over both ranks' tokens at EP=2, two accumulated partial ones at EP=1
    assert_trained_alike(ep2, ep1, start, N_STEPS, LR)
    expert = "model.layers.0.mlp.experts.7.down_proj.weight"
    assert (ep1[expert] - start[expert]).abs().max() > 1e-4, "the experts of the last EP rank did not train"
