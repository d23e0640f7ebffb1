"""The trainer against a plain loop that shares none of its code (tests/reference_loop.py: stock transformers,
F.cross_entropy, transformers' load-balancing loss, torch's AdamW, clipping and cosine schedule; PEFT for LoRA).

Each run trains 3 steps of the tiny model (fp32, fp32 Adam moments) through tests/integration/probed_train.py, which
records the documents every rank ran and every trainable parameter's gradient before the step; the reference replays
the same documents, one at a time. Compared each step: the loss, the load-balancing loss, the grad norm and the
gradient of every parameter (experts, routers, attention, norms, embeddings, lm_head; LoRA: the factors under PEFT's
names) and the last step's expert load; after the run, every weight (the exported hf/ checkpoint as transformers
loads it; LoRA: the adapter). Covered: fast path on and off, EP=1 and EP=2 (two processes), packed and padded micro-
batches, one and two micro-batches a step, full fine-tuning and LoRA."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import REPO, SAMPLE, TINY, assert_trained_alike, read_metrics, train_together
from reference_loop import ReferenceLoop

PROBE = REPO / "tests" / "integration" / "probed_train.py"
# CLIP below every run's grad norm (full fine-tuning ~1.5, LoRA ~0.35): the clip is active each step
LR, STEPS, AUX, CLIP, WEIGHT_DECAY, MIN_LR_RATIO = 3e-3, 3, 0.1, 0.25, 0.1, 0.1
# Adam's eps above the gradients' float32 rounding (~1e-7 of a tensor's largest element): with 1e-8, an element
# whose gradient is a near-cancelled sum turns its rounding into an lr-sized move of either sign, and the two runs'
# weights would part by more than the arithmetic compared (measured: 2e-4 on an embedding row after 3 steps).
BETAS, EPS, LORA_RANK, LORA_ALPHA = (0.9, 0.95), 1e-4, 4, 8.0
COMMON = ["--data", str(SAMPLE), "--max-steps", str(STEPS), "--max-tokens-per-batch", "512", "--max-seq-len", "512",
          "--lr", str(LR), "--lr-schedule", "cosine", "--warmup-steps", "0", "--min-lr-ratio", str(MIN_LR_RATIO),
          "--weight-decay", str(WEIGHT_DECAY), "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]),
          "--adam-eps", str(EPS), "--grad-clip", str(CLIP), "--seed", "11", "--adam-states", "fp32",
          # a large coefficient, so the router term's share of the gradients is far above rounding
          "--router-aux-loss-coef", str(AUX)]
LORA = ["--lora", "true", "--lora-targets", "attn,experts", "--lora-rank", str(LORA_RANK),
        "--lora-alpha", str(LORA_ALPHA)]
# name: (processes, options)
RUNS = {
    "ep1-fast-packed": (1, ["--ep-size", "1"]),
    "ep1-stock-padded-accum2": (1, ["--ep-size", "1", "--fast-path", "off", "--packing", "false", "--grad-accum", "2"]),
    "ep2-fast-packed-accum2": (2, ["--ep-size", "2", "--grad-accum", "2"]),
    "ep2-stock-padded": (2, ["--ep-size", "2", "--fast-path", "off", "--packing", "false"]),
    "lora-ep1-fast-packed": (1, ["--ep-size", "1", *LORA]),
    "lora-ep2-fast-padded": (2, ["--ep-size", "2", "--packing", "false", *LORA]),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{run: output dir}; the runs of one process count side by side (train_together)."""
    out = {name: tmp_path_factory.mktemp(name) for name in RUNS}
    for nproc in (1, 2):
        train_together([(out[name], [*COMMON, *args]) for name, (n, args) in RUNS.items() if n == nproc],
                       nproc=nproc, script=PROBE)
    return out


def _probes(out, nproc) -> list[dict]:
    return [torch.load(out / f"probe-rank{rank}.pt") for rank in range(nproc)]


def _hub_names(rank_grads: list[dict]) -> dict[str, torch.Tensor]:
    """Full fine-tuning gradients of every rank (AutoEP's names, each rank its block of experts) under the stock
    model's names: the router as mlp.gate, the experts as transformers' fused [E, 2I, H] gate/up (gate rows
    first) and [E, H, I] down."""
    out = {}
    for name, grad in rank_grads[0].items():
        if ".mlp.experts.w" in name:
            continue
        out[name.replace(".mlp.router.gate.", ".mlp.gate.")] = grad
    layers = {name[:-len(".w1")] for name in rank_grads[0] if name.endswith(".mlp.experts.w1")}
    for layer in layers:
        w1, w2, w3 = (torch.cat([g[f"{layer}.{w}"] for g in rank_grads]) for w in ("w1", "w2", "w3"))
        out[f"{layer}.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        out[f"{layer}.down_proj"] = w2
    return out


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude; a tensor the step left at zero must stay
    exactly zero (LoRA's A factors at the first step, whose B factors start at zero)."""
    scale = reference.abs().max()
    if scale == 0:
        return float(ours.abs().max())
    return float((ours - reference).abs().max() / scale)


@pytest.fixture(scope="module")
def replayed(trained):
    """{run: (the trainer's per-step metrics, per-step gradients under the reference's names, the reference's
    per-step records, the reference loop)}, built on first use."""
    cache = {}

    def replay(name):
        if name not in cache:
            nproc, args = RUNS[name]
            probes = _probes(trained[name], nproc)
            lora = None
            if "--lora" in args:
                lora = {"rank": LORA_RANK, "alpha": LORA_ALPHA, "initial": probes[0]["initial_adapter"]}
            loop = ReferenceLoop(TINY, lr=LR, steps=STEPS, min_lr_ratio=MIN_LR_RATIO, weight_decay=WEIGHT_DECAY,
                                 betas=BETAS, eps=EPS, grad_clip=CLIP, aux_coef=AUX, lora=lora)
            records, grads = [], []
            for step in range(STEPS):
                records.append(loop.step([doc for probe in probes for doc in probe["documents"][step]]))
                ours = [probe["grads"][step] for probe in probes]
                grads.append(ours[0] if lora else _hub_names(ours))
            cache[name] = (read_metrics(trained[name]), grads, records, loop)
        return cache[name]

    return replay


@pytest.mark.parametrize("run", RUNS)
def test_losses_and_grad_norms_match_the_reference(replayed, run):
    """The same documents through the same weights: float32 forwards in another order (grouped experts against
    eager's loop, sdpa/varlen against eager attention, sums over ranks and micro-batches) agree to ~1e-7 relative,
    and the weights of later steps differ by ~1e-7 of their movement (below): 1e-5 relative bounds both."""
    metrics, _, records, _ = replayed(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for ours, ref in zip(metrics, records):
        assert ours["loss"] == pytest.approx(ref.loss, rel=1e-5)
        assert ours["aux_loss"] == pytest.approx(ref.aux_loss, rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-5)
    assert min(r.grad_norm for r in records) > CLIP  # the clip was active


@pytest.mark.parametrize("run", RUNS)
def test_every_gradient_matches_the_reference(replayed, run):
    """Each parameter's gradient before clipping, each step, within 1e-5 of its largest element: float32 sums of a
    few hundred terms in another order agree to ~1e-6 of the largest (measured up to 1.3e-6), where one expert's
    gradient 1% off, or the loss scaled by 2, is 1e-2 or more."""
    _, grads, records, _ = replayed(run)
    for step, (ours, ref) in enumerate(zip(grads, records), start=1):
        assert sorted(ours) == sorted(ref.grads), step
        errors = {name: _relative_error(ours[name], ref.grads[name]) for name in ref.grads}
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, (step, worst, errors[worst])


@pytest.mark.parametrize("run", [name for name in RUNS if not name.startswith("lora")])
def test_expert_load_is_the_reference_routing(trained, replayed, run):
    """expert_load.jsonl's last step (every rank's tokens) against the top-k of the reference's router logits. A token
    whose second and third router probabilities lie within float32 rounding of each other may go either way, moving
    one count from one expert to another (none seen): at most two such tokens a layer are allowed."""
    _, _, records, _ = replayed(run)
    rows = [json.loads(line) for line in (trained[run] / "expert_load.jsonl").read_text().splitlines()]
    last = sorted((r for r in rows if r["step"] == STEPS), key=lambda r: r["layer"])
    reference = records[-1].expert_load
    assert [r["layer"] for r in last] == list(range(len(reference)))
    for row, expected in zip(last, reference):
        assert sum(row["tokens"]) == sum(expected)  # every real token's top-k slots, no padding, no filler
        assert sum(abs(a - b) for a, b in zip(row["tokens"], expected)) <= 4, (row, expected)


@pytest.mark.parametrize("run", [name for name in RUNS if not name.startswith("lora")])
def test_trained_weights_match_the_reference(trained, replayed, run):
    """hf/ as stock transformers loads it against the reference model after 3 steps (tolerances: helpers'
    assert_trained_alike, for sums in another order)."""
    _, _, _, loop = replayed(run)
    ours = AutoModelForCausalLM.from_pretrained(trained[run] / "hf", dtype=torch.float32).state_dict()
    start = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).state_dict()
    reference = {name: p.detach() for name, p in loop.model.state_dict().items()}
    assert_trained_alike(ours, reference, start, STEPS, LR)


@pytest.mark.parametrize("run", [name for name in RUNS if name.startswith("lora")])
def test_trained_adapter_matches_peft(trained, replayed, run):
    """adapter/ against PEFT's factors after 3 steps, from the same initial factors."""
    from peft import get_peft_model_state_dict

    _, _, _, loop = replayed(run)
    nproc, _ = RUNS[run]
    ours = load_file(trained[run] / "adapter" / "adapter_model.safetensors")
    reference = {name: p.detach() for name, p in get_peft_model_state_dict(loop.model).items()}
    start = {name.replace(".default.", "."): p for name, p in _probes(trained[run], nproc)[0]["initial_adapter"].items()}
    assert sorted(ours) == sorted(reference)
    assert_trained_alike(ours, reference, {name: start[name] for name in reference}, STEPS, LR)
