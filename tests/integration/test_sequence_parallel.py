"""Ulysses sequence parallelism: 4 processes at --sp-size 2 (two SP groups, so 2 data-parallel ranks) train what 2
processes without SP train, at EP=1 and EP=2.

The SP runs take --max-tokens-per-batch 128, rows of 2 x 128 tokens; the runs without SP rows of 256: both plan the
same rows, and SP group k runs the rows of data-parallel rank k, each of its ranks a 128-token slice, the rows'
documents crossing the cut. Through tests/integration/sequence_parallel_probe.py, each step: the per-token losses
of every row (the SP group's slices gathered), every parameter's gradient before the step; the metrics. Two steps of
two micro-batches (the router's counting pass runs too), large router coefficients, fp32 Adam moments. The SP run at
EP=2 also saves a checkpoint after step 1; a run resumed from it at the same layout trains step 2 as it did, and one
resumed at 2 processes without SP (through DeepSpeed's universal checkpoint) trains step 2 as the run without SP did.

At EP=2 the expert groups are ranks {0, 1} and {2, 3} with and without SP (DeepSpeed's AutoEP builds them with
mp_mode "sp", which without tensor parallelism are the same groups): rank r of the SP run holds the experts of rank
r % 2 of the run without."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import EVAL, REPO, SAMPLE, TINY, assert_trained_alike, read_metrics, train, train_together

pytestmark = pytest.mark.slow  # eight processes at once on the CI machine's two cores: ~75 s

PROBE = REPO / "tests" / "integration" / "sequence_parallel_probe.py"
LR, STEPS = 3e-3, 2
# Adam's eps above the gradients' float32 rounding, as in test_reference.py: with 1e-8 an element whose gradient
# nearly cancels moves by up to lr either way, and step 2's gradients part by ~1e-5 instead of ~1e-6.
COMMON = ["--data", str(SAMPLE), "--max-steps", str(STEPS), "--max-seq-len", "256", "--lr", str(LR),
          "--warmup-steps", "0", "--seed", "5", "--grad-accum", "2", "--router-aux-loss-coef", "0.1",
          "--router-z-loss-coef", "0.01", "--adam-states", "fp32", "--adam-eps", "1e-4", "--eval-data", str(EVAL)]
EPS = (1, 2)


def _run(sp: int, ep: int) -> list[str]:
    return [*COMMON, "--ep-size", str(ep), "--max-tokens-per-batch", str(256 // sp), "--sp-size", str(sp)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(sp, ep): output dir}; "resumed" and "resumed_sp1": the SP run at EP=2 resumed from its step-1 checkpoint at
    its own layout and at 2 processes without SP, and "resumed_sp1_stdout" the latter's output."""
    out = {(sp, ep): tmp_path_factory.mktemp(f"sp{sp}_ep{ep}") for sp in (1, 2) for ep in EPS}
    save = ["--save-steps", "1", "--save-total-limit", "0"]
    train_together([(out[1, ep], _run(1, ep)) for ep in EPS], nproc=2, script=PROBE)
    train_together([(out[2, ep], _run(2, ep) + (save if ep == 2 else [])) for ep in EPS], nproc=4, script=PROBE)

    def resume(name: str, sp: int, nproc: int):
        """The SP=2, EP=2 run's step-1 checkpoint and metrics copied to a new directory `name` and resumed there."""
        resumed = out[name] = tmp_path_factory.mktemp(f"sp2_ep2_{name}")
        shutil.copytree(out[2, 2] / "checkpoints" / "step-1", resumed / "checkpoints" / "step-1")
        shutil.copy(out[2, 2] / "metrics.jsonl", resumed / "metrics.jsonl")
        return train(resumed, *_run(sp, 2), "--resume", str(resumed / "checkpoints" / "step-1"), nproc=nproc)

    resume("resumed", sp=2, nproc=4)
    # the same checkpoint at another layout: 2 processes without SP, rows of 256 tokens (its 2 x 128)
    out["resumed_sp1_stdout"] = resume("resumed_sp1", sp=1, nproc=2).stdout
    return out


def _steps(out) -> list[dict]:
    return [m for m in read_metrics(out) if "loss" in m]


def _probes(out, nproc) -> list[dict]:
    return [torch.load(out / f"sp-probe-rank{rank}.pt") for rank in range(nproc)]


@pytest.mark.parametrize("ep", EPS)
def test_sp_groups_run_the_rows_of_the_data_parallel_ranks_split_within_documents(runs, ep):
    plain, split = _probes(runs[1, ep], 2), _probes(runs[2, ep], 4)
    crossing = 0
    for rank in range(4):
        assert split[rank]["rows"] == plain[rank // 2]["rows"]
    for rows in plain[0]["rows"] + plain[1]["rows"]:
        for lengths in rows:
            cut = (sum(lengths) + 1) // 2  # the slices' boundary (the row padded to an even length)
            ends = torch.tensor(lengths).cumsum(0).tolist()
            crossing += any(end - n < cut < end for n, end in zip(lengths, ends))
    # documents whole within a row, split between the ranks of its group: 5 of the 8 rows have one across the cut
    assert crossing >= 4


@pytest.mark.parametrize("ep", EPS)
def test_per_token_losses_of_split_rows_are_those_of_whole_rows(runs, ep):
    """Each token's loss through slices whose attention gathers the whole row: float32 sums in another blocking
    (GEMMs over 128 rows instead of 256), ~1e-7 relative of losses ~7.6, bounded at 1e-5 absolute (measured 9.5e-7,
    and 0 at step 1: same weights, same kernels on each token). Both ranks of a group gather the same row."""
    plain, split = _probes(runs[1, ep], 2), _probes(runs[2, ep], 4)
    for rank in range(4):
        for step in range(STEPS):
            ours, partner, reference = (probe["losses"][step] for probe in (split[rank], split[rank ^ 1],
                                                                           plain[rank // 2]))
            for j in range(2):
                assert ours[j].shape == reference[j].shape
                assert (ours[j] - reference[j]).abs().max() < 1e-5, (rank, step, j)
                assert torch.equal(ours[j], partner[j])


@pytest.mark.parametrize("ep", EPS)
def test_gradients_are_those_of_whole_rows(runs, ep):
    """Every parameter's gradient before the step within 1e-5 of its largest element: two ranks' shares of each
    row's gradient summed by ZeRO over all four ranks (dense) or the expert's data-parallel group, in another order
    than one rank's sum; float32, ~1e-7 of the largest at step 1 (measured 4.5e-7) and a few 1e-7 after one Adam step
    apart; a missing share would be O(1)."""
    plain, split = _probes(runs[1, ep], 2), _probes(runs[2, ep], 4)
    for rank in range(4):
        for step in range(STEPS):
            ours, reference = split[rank]["grads"][step], plain[rank % 2]["grads"][step]
            assert sorted(ours) == sorted(reference)
            errors = {name: float((ours[name] - g).abs().max() / g.abs().max()) for name, g in reference.items()}
            worst = max(errors, key=errors.get)
            assert errors[worst] < 1e-5, (rank, step, worst, errors[worst])


@pytest.mark.parametrize("ep", EPS)
def test_metrics_count_each_token_once(runs, ep):
    """The same label and token counts (the z-loss divides by the real tokens, the aux loss by them squared), the
    same expert load (the padding of the rows left out), the same tokens attended to per token (FLOPs over
    tokens/s), and the same losses and grad norm to float32 rounding."""
    plain, split = _steps(runs[1, ep]), _steps(runs[2, ep])
    assert [m["step"] for m in split] == list(range(1, STEPS + 1))
    for a, b in zip(split, plain):
        assert a["num_label_tokens"] == b["num_label_tokens"]
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "expert_load_max"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["tflops_per_gpu"] / a["tps_per_gpu"] == pytest.approx(b["tflops_per_gpu"] / b["tps_per_gpu"],
                                                                        rel=1e-12)
    loads = [[json.loads(line) for line in (runs[sp, ep] / "expert_load.jsonl").read_text().splitlines()]
             for sp in (2, 1)]
    assert [(r["step"], r["layer"], r["tokens"]) for r in loads[0]] == [(r["step"], r["layer"], r["tokens"])
                                                                          for r in loads[1]]


@pytest.mark.parametrize("ep", EPS)
def test_evaluation_splits_its_rows_too(runs, ep):
    """The held-out loss after the last step over the same label tokens (evaluation runs sequence-parallel as well),
    equal to float32 rounding."""
    (plain,), (split,) = ([m for m in read_metrics(runs[sp, ep]) if "eval_loss" in m] for sp in (1, 2))
    assert split["step"] == plain["step"] == STEPS
    assert split["eval_label_tokens"] == plain["eval_label_tokens"] > 0
    assert split["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("ep", EPS)
def test_trained_weights_match(runs, ep):
    start = load_file(TINY / "model.safetensors")
    assert_trained_alike(load_file(runs[2, ep] / "hf" / "model.safetensors"),
                         load_file(runs[1, ep] / "hf" / "model.safetensors"), start, STEPS, LR)


def test_a_resume_at_the_same_layout_trains_the_step_it_would_have(runs):
    """RNG, optimizer and data position restored at 4 processes, SP=2, EP=2: step 2 and the weights bit for bit."""
    uninterrupted, resumed = _steps(runs[2, 2]), _steps(runs["resumed"])
    keys = ("loss", "grad_norm", "aux_loss", "z_loss", "num_label_tokens", "lr")
    assert [{k: m[k] for k in keys} for m in resumed] == [{k: m[k] for k in keys} for m in uninterrupted]
    weights = load_file(runs["resumed"] / "hf" / "model.safetensors")
    for name, value in load_file(runs[2, 2] / "hf" / "model.safetensors").items():
        assert torch.equal(weights[name], value), name


def test_a_resume_without_sp_trains_the_step_a_run_without_sp_trains(runs):
    """The SP=2 checkpoint at 2 processes, SP=1, EP=2: weights, moments, schedule and data position through the
    universal checkpoint; step 2 and the weights as the uninterrupted run at that layout, to the float32 rounding of
    summing the gradients in another order (see assert_trained_alike)."""
    step1 = runs["resumed_sp1"] / "checkpoints" / "step-1"
    assert ("step-1 was saved by 4 process(es) at EP=2 SP=2 (full fine-tuning): resumed through DeepSpeed's "
            "universal checkpoint step-1/universal") in runs["resumed_sp1_stdout"]
    assert f"resumed from {step1} at step 1" in runs["resumed_sp1_stdout"]
    straight, again = _steps(runs[1, 2]), _steps(runs["resumed_sp1"])
    assert [m["step"] for m in again] == [1, 2]  # step 1's line copied with the checkpoint
    resumed = again[1]
    assert resumed["num_label_tokens"] == straight[1]["num_label_tokens"]  # the same examples
    for name in ("loss", "aux_loss", "z_loss"):
        assert resumed[name] == pytest.approx(straight[1][name], rel=1e-5), name
    assert resumed["lr"] == pytest.approx(straight[1]["lr"], rel=1e-9)
    assert_trained_alike(load_file(runs["resumed_sp1"] / "hf" / "model.safetensors"),
                         load_file(runs[1, 2] / "hf" / "model.safetensors"), load_file(TINY / "model.safetensors"),
                         STEPS, LR)
