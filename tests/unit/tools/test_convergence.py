import math

import pytest

from qwen_moe_ft.tools.convergence import bigram_chain, chain_entropy, make_batches, plot, summarise


def test_batches_walk_the_chain_in_documents_of_the_benchmark_lengths():
    batches, floor = make_batches(steps=3, tokens=8192, lengths="chat", vocab=64, seed=0, successors=4)
    nxt, probs = bigram_chain(64, 4, seed=0)
    assert len(batches) == 3
    for docs in batches:
        assert sum(len(d["input_ids"]) for d in docs) == 8192
        for d in docs:
            assert d["labels"] == d["input_ids"]
            for a, b in zip(d["input_ids"], d["input_ids"][1:]):
                assert b in nxt[a].tolist()  # every step follows one of the token's successors
    assert floor == pytest.approx(chain_entropy(probs)) and 0 < floor < math.log(4)
    again, _ = make_batches(steps=3, tokens=8192, lengths="chat", vocab=64, seed=0, successors=4)
    assert again == batches  # every run of a comparison sees the same data


def test_successors_are_drawn_with_the_chain_probabilities():
    batches, _ = make_batches(steps=20, tokens=8192, lengths="chat", vocab=4, seed=1, successors=2)
    nxt, probs = bigram_chain(4, 2, seed=1)
    pairs = [(a, b) for docs in batches for d in docs for a, b in zip(d["input_ids"], d["input_ids"][1:])]
    checked = 0
    for token in range(4):
        after = [b for a, b in pairs if a == token]
        if nxt[token, 0] == nxt[token, 1] or len(after) < 10_000:  # a token the chain rarely reaches
            continue
        share = sum(b == nxt[token, 0].item() for b in after) / len(after)
        # >= 10k transitions: the binomial standard deviation is <= 0.005; 0.03 is 6 of them
        assert share == pytest.approx(probs[token, 0].item(), abs=0.03)
        checked += 1
    assert checked >= 2


def test_summary_compares_each_run_with_the_reference_and_the_plot_is_drawn(tmp_path):
    report = dict(gpu="cpu", layers=4, tokens=8192, lr=2e-4, runs={
        "ours_bf16": dict(losses=[3.0] * 10 + [2.02] * 10, loss_floor=1.7),
        "hf_adamw": dict(losses=[3.0] * 10 + [2.0] * 10, loss_floor=1.7)})
    summary = summarise(report, window=10)
    assert summary["final_smoothed"] == {"ours_bf16": 2.02, "hf_adamw": 2.0}
    assert summary["relative_to_hf_adamw"]["ours_bf16"] == pytest.approx(0.01)
    plot(report, str(tmp_path / "c.png"), window=10)
    assert (tmp_path / "c.png").stat().st_size > 10_000

