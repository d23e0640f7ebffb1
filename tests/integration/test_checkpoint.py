"""Checkpoints: SIGTERM saves and stops, --resume continues exactly (four processes at EP=2, the runs of
conftest.py), a checkpoint saved at two processes at EP=2 resumes at one process, at four at EP=4 and at four at EP=2
through DeepSpeed's universal checkpoint and trains what a run at that layout trains (fp32 moments, and bf16 moments
through their widening; bf16 weights with their masters kept as low bits), a resume whose steps would take other examples is refused before loading, an interrupted
save is never the one resumed from, and a resumed run saves over the step `latest` names."""
import shutil

import pytest
from safetensors.torch import load_file

from helpers import (FOUR_RANK_LR, FOUR_RANK_RUN, FOUR_RANK_STEPS, TINY, assert_trained_alike, max_rel_err,
                     read_metrics, train)
from qwen_moe_ft.checkpoint import COMPLETE, CheckpointError, complete_checkpoints, resolve


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(four_rank_ep2_resumed):
    resumed, output, stopped_at, _ = four_rank_ep2_resumed
    assert 1 <= stopped_at < FOUR_RANK_STEPS, "SIGTERM came after the last step: nothing was resumed"
    assert f"stopped by SIGTERM after step {stopped_at}; continue with --resume latest" in output
    assert (resumed / "checkpoints" / f"step-{stopped_at}" / COMPLETE).exists()


@pytest.mark.slow
def test_resumed_run_continues_exactly_with_expert_groups_of_two_ranks(four_rank_runs, four_rank_ep2_resumed):
    """Four processes at EP=2, two micro-batches each a step: moments, expert shards, the gate/up cache, the data
    position within the epoch and the schedule all come back."""
    resumed, _, stopped_at, second_output = four_rank_ep2_resumed
    assert f"resumed from {resumed / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in second_output
    straight, again = read_metrics(four_rank_runs[2]), read_metrics(resumed)
    assert [m["step"] for m in again] == [m["step"] for m in straight] == list(range(1, FOUR_RANK_STEPS + 1))
    # the same arithmetic in the same order: only a lost or stale state would move a loss or a weight
    for a, b in zip(straight, again):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    w1, w2 = (load_file(run / "hf" / "model.safetensors") for run in (four_rank_runs[2], resumed))
    for name in w1:
        assert max_rel_err(w2[name], w1[name]) < 1e-6, name


# Eight micro-batches a step at every layout, as the runs of conftest.py: two processes accumulating four
TWO_RANKS_EP2 = [*FOUR_RANK_RUN, "--ep-size", "2", "--grad-accum", "4"]
RESHAPED = {"accum": ("--ep-size", "1", "--grad-accum", "8"), 4: ("--ep-size", "4", "--grad-accum", "2"),
            2: ("--ep-size", "2", "--grad-accum", "2")}


@pytest.fixture(scope="module")
def reshaped(tmp_path_factory):
    """Two processes at EP=2 saving after each step, and its step-1 resumed at one process (EP=1) and at four (EP=4,
    EP=2: expert groups of two ranks), each into a directory of its own: {key of four_rank_runs: (output dir, stdout)}
    and the saved run's directory under "saved"."""
    saved = tmp_path_factory.mktemp("ranks2_ep2_saved")
    train(saved, *TWO_RANKS_EP2, "--save-steps", "1", "--save-total-limit", "0", "--export-hf", "false")
    out = {"saved": saved}
    for key, layout in RESHAPED.items():  # one after another: the first converts step-1, the others read it
        out[key] = tmp_path_factory.mktemp(f"resumed_{key}")
        proc = train(out[key], *FOUR_RANK_RUN, *layout, "--resume", str(saved / "checkpoints" / "step-1"),
                     nproc=1 if key == "accum" else 4)
        out[key] = out[key], proc.stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RESHAPED))
def test_a_checkpoint_resumes_at_another_layout_and_trains_what_that_layout_trains(four_rank_runs, reshaped, key):
    """fp32 master weights, Adam's moments and step, the schedule and the data position come back through DeepSpeed's
    universal checkpoint, at 1 process (EP=1) and at 4 (EP=4, EP=2). The uninterrupted run at the new layout summed
    step 1's gradients in another order than the two processes did (gloo's reduce over 2 ranks of 4 accumulated
    micro-batches each, against 4 of 2 or 1 of 8): the float32 rounding of test_four_ranks.py, ~1e-7 relative a step,
    which steps 2 and 3 carry on. A lost moment or step count would change an update by O(lr)."""
    out, stdout = reshaped[key]
    step1 = reshaped["saved"] / "checkpoints" / "step-1"
    assert "step-1 was saved by 2 process(es) at EP=2 (full fine-tuning): resumed through DeepSpeed's universal " \
           "checkpoint step-1/universal" in stdout
    if key == "accum":  # the first resume converted it
        assert "converted step-1 once into DeepSpeed's universal checkpoint step-1/universal" in stdout
        # the command as a person would run it again: from the step into the folder it ended in
        assert (f"deepspeed.checkpoint.ds_to_universal --input_folder {step1} --output_folder {step1 / 'universal'}"
                ) in stdout
    assert f"resumed from {step1} at step 1" in stdout
    straight, again = read_metrics(four_rank_runs[key]), read_metrics(out)
    assert [m["step"] for m in again] == list(range(2, FOUR_RANK_STEPS + 1))
    for a, b in zip(straight[1:], again):
        assert a["num_label_tokens"] == b["num_label_tokens"]  # the same examples
        for name in ("loss", "aux_loss", "z_loss"):
            assert a[name] == pytest.approx(b[name], rel=1e-5), (a["step"], name)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert_trained_alike(load_file(out / "hf" / "model.safetensors"),
                         load_file(four_rank_runs[key] / "hf" / "model.safetensors"),
                         load_file(TINY / "model.safetensors"), FOUR_RANK_STEPS, FOUR_RANK_LR)


@pytest.mark.slow
def test_bf16_moments_resume_at_another_layout(tmp_path_factory):
    """The fast path's default bf16 moments: widened to fp32 for DeepSpeed's converter, narrowed again after the
    load. Two processes at EP=2 run 2 steps and save after the first; one process resumes step-1 for the second. The
    moments carried into step 2 are the saved run's bf16 values exactly; step 2's own rounding (random bits drawn
    per partition offset, which the layout changes) reaches only later steps, so the weights after step 2 differ by
    the reduction order alone."""
    saved, resumed = tmp_path_factory.mktemp("bf16_saved"), tmp_path_factory.mktemp("bf16_resumed")
    run = [*FOUR_RANK_RUN, "--max-steps", "2", "--adam-states", "bf16"]
    train(saved, *run, *RESHAPED[2][:2], "--grad-accum", "4", "--save-steps", "1")
    proc = train(resumed, *run, *RESHAPED["accum"], "--resume", str(saved / "checkpoints" / "step-1"), nproc=1)
    step1 = saved / "checkpoints" / "step-1"
    assert "adam moments bf16" in proc.stdout
    assert (f"--output_folder {step1 / 'universal'} (its input, universal.input, was step-1 with the fast path's bf16 "
            "moments widened to fp32, which the converter needs; removed after)") in proc.stdout
    straight, again = read_metrics(saved), read_metrics(resumed)
    assert [m["step"] for m in again] == [2]
    assert again[0]["loss"] == pytest.approx(straight[1]["loss"], rel=1e-5)
    assert_trained_alike(load_file(resumed / "hf" / "model.safetensors"), load_file(saved / "hf" / "model.safetensors"),
                         load_file(TINY / "model.safetensors"), 2, FOUR_RANK_LR)


@pytest.mark.slow
@pytest.mark.parametrize("masters, applied", [("fp32", "master_low_bits"), ("bf16", "bf16_master_weights")])
def test_bf16_weights_resume_their_low_bit_masters_exactly_and_at_another_layout(tmp_path_factory, masters, applied):
    """bf16 weights: the fast path keeps the fp32 masters as the weights' low 16 bits (master_low_bits), or the
    weights alone as the masters (--master-weights bf16), the dense groups partitioned over both processes. Two
    processes at EP=2 run 3 steps saving after each; resuming step-1 at that layout repeats steps 2 and 3 exactly (the
    checkpoint's fp32 masters were written out from the bits and taken back into them; the stochastic rounding's bits
    follow the step and the partition position); resuming it at one process goes through DeepSpeed's universal
    checkpoint, and its step 2 is the saved run's to the reduction order."""
    saved, same, other = (tmp_path_factory.mktemp(name) for name in ("bits_saved", "bits_same", "bits_other"))
    run = [*FOUR_RANK_RUN, "--dtype", "bf16", "--adam-states", "fp32", "--master-weights", masters]
    proc = train(saved, *TWO_RANKS_EP2, "--dtype", "bf16", "--adam-states", "fp32", "--master-weights", masters,
                 "--save-steps", "1", "--save-total-limit", "0")
    assert applied in proc.stdout.split("refused")[0]  # applied, not refused
    step1 = str(saved / "checkpoints" / "step-1")
    train(same, *TWO_RANKS_EP2, "--dtype", "bf16", "--adam-states", "fp32", "--master-weights", masters,
          "--resume", step1)
    train(other, *run, *RESHAPED["accum"], "--resume", step1, nproc=1)  # the saved run's 3 steps: its schedule
    straight, again, elsewhere = read_metrics(saved), read_metrics(same), read_metrics(other)
    assert [m["step"] for m in again] == [2, 3] and [m["step"] for m in elsewhere] == [2, 3]
    for a, b in zip(straight[1:], again):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    w1, w2 = (load_file(out / "hf" / "model.safetensors") for out in (saved, same))
    for name in w1:
        assert w1[name].equal(w2[name]), name
    assert elsewhere[0]["loss"] == pytest.approx(straight[1]["loss"], rel=1e-5)  # measured 1.1e-6 apart


@pytest.mark.slow
def test_a_layout_whose_steps_would_take_other_micro_batches_stops_before_loading(reshaped, tmp_path):
    """Saved at 2 processes x 4 micro-batches: one process must accumulate 8 (the unit tests cover a number of
    processes that no --grad-accum serves)."""
    proc = train(tmp_path, *FOUR_RANK_RUN, "--ep-size", "1", "--grad-accum", "4", "--resume",
                 str(reshaped["saved"] / "checkpoints" / "step-1"), nproc=1, check=False)
    assert proc.returncode != 0
    assert ("step-1 was saved by 2 process(es) with --grad-accum 4, 8 micro-batches a step; 1 process(es) with "
            "--grad-accum 4 take 4: its steps would train other examples. Resume with --grad-accum 8 (1 x 8 = 8)"
            ) in proc.stderr
    # stopped by our check, not inside DeepSpeed's loader (torchrun adds its own ChildFailedError summary)
    assert "resumed from" not in proc.stdout and "load_checkpoint" not in proc.stderr


def test_interrupted_save_is_never_resumed_from(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        (root / f"step-{step}").mkdir(parents=True)
        if complete:
            (root / f"step-{step}" / COMPLETE).write_text(str(step))
    (root / "latest").write_text("step-20\n")
    assert [p.name for p in complete_checkpoints(root)] == ["step-10", "step-20"]
    assert resolve("latest", root).name == "step-20"
    with pytest.raises(CheckpointError, match="not a finished checkpoint"):
        resolve(str(root / "step-30"), root)
    with pytest.raises(CheckpointError, match="--save-steps"):
        resolve("latest", tmp_path / "nothing")


def test_save_total_limit_keeps_the_newest(four_rank_runs):
    """The one-process run of conftest.py saved after each of its 3 steps with --save-total-limit 2."""
    root = four_rank_runs["accum"] / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-2", "step-3"]
    assert (root / "latest").read_text().strip() == "step-3"


def accum_run(grad_accum: int) -> list[str]:
    """The options of conftest.py's one-process run (grad_accum 8), saving a checkpoint after each step."""
    return [*FOUR_RANK_RUN, "--ep-size", "1", "--grad-accum", str(grad_accum), "--save-steps", "1",
            "--save-total-limit", "2"]


def test_resuming_with_another_grad_accum_stops_before_loading_naming_it(four_rank_runs, tmp_path):
    step = four_rank_runs["accum"] / "checkpoints" / "step-3"
    proc = train(tmp_path, *accum_run(4), "--resume", str(step), nproc=1, check=False)
    assert proc.returncode != 0
    assert ("--grad-accum was 8 when step-3 was saved, now 4: its steps would train other examples. Resume with "
            "--grad-accum 8, or start a new run") in proc.stderr
    assert "resumed from" not in proc.stdout and "load_checkpoint" not in proc.stderr


def test_resuming_with_another_lr_or_length_stops_before_loading_naming_them(four_rank_runs, tmp_path):
    """The loaded scheduler keeps the saved peak lr and takes its length from the options: both would change
    silently."""
    step = four_rank_runs["accum"] / "checkpoints" / "step-3"
    proc = train(tmp_path, *accum_run(8), "--lr", "0.001", "--max-steps", "5", "--resume", str(step), nproc=1,
                 check=False)
    assert proc.returncode != 0
    assert (f"--lr was {FOUR_RANK_LR} when step-3 was saved, now 0.001; its cosine schedule spanned 3 steps, now 5 "
            "(--max-steps, or --epochs)") in proc.stderr
    assert f"Resume with --lr {FOUR_RANK_LR} --max-steps 3, or start a new run" in proc.stderr
    assert "resumed from" not in proc.stdout and "load_checkpoint" not in proc.stderr


def test_a_run_resumed_from_an_earlier_step_saves_over_the_step_latest_names(four_rank_runs, tmp_path):
    """Resumed from step-2, the run saves step 3 again while `latest` names the first run's step-3."""
    run = tmp_path / "run"
    shutil.copytree(four_rank_runs["accum"], run)
    root = run / "checkpoints"
    proc = train(run, *accum_run(8), "--resume", str(root / "step-2"), nproc=1)
    assert f"resumed from {root / 'step-2'} at step 2" in proc.stdout
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-2", "step-3"]  # beside DeepSpeed's scripts
    assert resolve("latest", root) == root / "step-3"
    first, again = read_metrics(four_rank_runs["accum"]), read_metrics(run)
    assert [m["step"] for m in again] == [1, 2, 3]
    assert again[-1]["loss"] == pytest.approx(first[-1]["loss"], rel=1e-6)
