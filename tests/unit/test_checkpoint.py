import json
import os
import shutil
from pathlib import Path

import pytest

from qwen_moe_ft.checkpoint import (COMPLETE, LATEST, CheckpointError, DataOrder, Layout, Schedule, check_data_order,
                                   check_layout, check_schedule, complete_checkpoints, prune, resolve, save,
                                   saved_layout)
from qwen_moe_ft.config import TrainConfig


def finished(root, *steps):
    for step in steps:
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / COMPLETE).write_text(str(step))


def test_prune_keeps_the_newest(tmp_path):
    finished(tmp_path, 2, 4, 6)
    (tmp_path / "step-5").mkdir()  # half-written
    prune(tmp_path, 2, latest=tmp_path / "step-6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]


def test_prune_never_removes_what_latest_names(tmp_path):
    """A run resumed from step-100 saves step-110 beside an older run's step-200 and step-210."""
    finished(tmp_path, 100, 110, 200, 210)
    prune(tmp_path, 2, latest=tmp_path / "step-110")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-110", "step-210"]
    prune(tmp_path, 1, latest=tmp_path / "step-110")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-110"]


def test_keep_zero_keeps_all(tmp_path):
    finished(tmp_path, 1, 2, 3)
    prune(tmp_path, 0, latest=tmp_path / "step-3")
    assert len(complete_checkpoints(tmp_path)) == 3


def test_another_layout_resumes_but_not_from_full_fine_tuning_into_lora_or_from_per_rank_lora_files(tmp_path):
    step = tmp_path / "step-4"
    step.mkdir()
    saved = Layout(processes=2, ep_size=2, lora=False)
    (step / COMPLETE).write_text(json.dumps({"step": 4, "layout": saved._asdict()}))
    assert saved_layout(step) == saved
    check_layout(step, saved)
    check_layout(step, Layout(processes=4, ep_size=4, lora=False))  # through DeepSpeed's universal checkpoint
    with pytest.raises(CheckpointError, match=r"saved by 2 process\(es\) at EP=2 \(full fine-tuning\); this run has "
                                              r"1 process\(es\) at EP=1 \(LoRA\). Resume it without --lora true"):
        check_layout(step, Layout(processes=1, ep_size=1, lora=True))
    lora = Layout(processes=2, ep_size=2, lora=True)
    (step / COMPLETE).write_text(json.dumps({"step": 4, "layout": lora._asdict()}))
    (step / "lora_rank0.pt").write_bytes(b"")  # the per-rank ZeRO partitions of earlier versions
    with pytest.raises(CheckpointError, match=r"per-rank LoRA form of earlier versions.*NUM_PROCESSES=2.*--ep-size 2"):
        check_layout(step, Layout(processes=1, ep_size=1, lora=True))
    (step / "lora_slices_rank0.pt").write_bytes(b"")
    check_layout(step, Layout(processes=1, ep_size=1, lora=True))
    (step / COMPLETE).write_text("4\n")  # a marker from before layouts were recorded: nothing to check against
    check_layout(step, Layout(processes=1, ep_size=1, lora=False))


class Crash(Exception):
    pass


class FakeEngine:
    """What save() asks of a DeepSpeed engine: its files written into save_dir/tag."""

    def __init__(self, weights: str, fail_after_first_file: bool = False):
        self.weights, self.fail = weights, fail_after_first_file

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "model_states.pt").write_text(self.weights)
        if self.fail:
            raise Crash("the disk filled up")
        (path / "optim_states.pt").write_text(self.weights)


LAYOUT = Layout(processes=1, ep_size=1, lora=False)
ORDER = DataOrder.of(TrainConfig().flat(), [5, 7, 3])
SCHEDULE = Schedule.of(TrainConfig().flat(), 100)


def save_step(root, step, engine):
    return save(engine, root, step, rank=0, keep=2, layout=LAYOUT, data_order=ORDER, schedule=SCHEDULE)


def resumed_weights(root) -> str:
    """What `--resume latest` would load: the checkpoint must be complete and whole."""
    path = resolve("latest", root)
    assert json.loads((path / COMPLETE).read_text())["step"] == int(path.name.split(".")[0][len("step-"):])
    files = {p.name for p in path.iterdir()}
    assert {"model_states.pt", "optim_states.pt", "rng_rank0.pt"} <= files, files
    weights = {(path / name).read_text() for name in ("model_states.pt", "optim_states.pt")}
    assert len(weights) == 1, "the files of two saves mixed"
    return weights.pop()


def test_saving_a_step_again_keeps_the_one_latest_names_until_the_new_one_is_complete(tmp_path):
    """A run resumed from step-4 saves step 6 again while `latest` names the earlier run's step-6."""
    save_step(tmp_path, 4, FakeEngine("step 4"))
    save_step(tmp_path, 6, FakeEngine("earlier run"))
    with pytest.raises(Crash):
        save_step(tmp_path, 6, FakeEngine("resumed run", fail_after_first_file=True))
    assert resumed_weights(tmp_path) == "earlier run"
    save_step(tmp_path, 6, FakeEngine("resumed run"))
    assert resumed_weights(tmp_path) == "resumed run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-4", "step-6"]


# FakeEngine writes with Path.write_text: a crash between DeepSpeed's files too
FILESYSTEM_CALLS = [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "open"), (shutil, "rmtree"),
                    (Path, "write_text")]


@pytest.mark.parametrize("earlier", ["the same step", "another step"])
def test_a_crash_at_any_point_of_a_save_leaves_latest_naming_a_complete_checkpoint(tmp_path, monkeypatch, earlier):
    """Every filesystem call of save() in turn raises (a crash there); `latest` still resolves to a complete
    checkpoint, the earlier one or the new one, and the next save of the step succeeds."""
    crash_at = 0
    while True:
        crash_at += 1
        root = tmp_path / str(crash_at)
        save_step(root, 6 if earlier == "the same step" else 5, FakeEngine("earlier"))
        calls = 0

        def crashing(original):
            def call(*args, **kwargs):
                nonlocal calls
                calls += 1
                if calls == crash_at:
                    raise Crash(f"call {calls}: {original.__name__}{args}")
                return original(*args, **kwargs)
            return call

        with monkeypatch.context() as patch:
            for module, name in FILESYSTEM_CALLS:
                patch.setattr(module, name, crashing(getattr(module, name)))
            try:
                save_step(root, 6, FakeEngine("new"))
                finished = True
            except Crash:
                finished = False
        assert resumed_weights(root) in ("earlier", "new"), crash_at
        if finished:
            assert resumed_weights(root) == "new"
            break
        save_step(root, 6, FakeEngine("new"))
        assert resumed_weights(root) == "new", crash_at
        assert not [p.name for p in root.iterdir() if p.name not in ("latest", "step-5", "step-6")], crash_at
    assert crash_at > 10, "the patched calls were hardly reached: few crash points were tried"


def test_files_and_directories_reach_the_disk_before_complete_and_before_latest(tmp_path, monkeypatch):
    save_step(tmp_path, 6, FakeEngine("earlier"))
    events = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def logged_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def logged_move(move):
        def call(src, dst):
            events.append(("move", Path(dst)))
            move(src, dst)
        return call

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "rename", logged_move(rename))
    monkeypatch.setattr(os, "replace", logged_move(replace))
    save_step(tmp_path, 6, FakeEngine("new"))
    moves = [i for i, (kind, _) in enumerate(events) if kind == "move"]
    complete = next(i for i in moves if events[i][1].name == COMPLETE)
    staged = events[complete][1].parent
    synced_before = {path for kind, path in events[:complete] if kind == "fsync"}
    assert {staged / "model_states.pt", staged / "optim_states.pt", staged / "rng_rank0.pt", staged} <= synced_before
    assert ("fsync", staged) in events[complete + 1:], "the COMPLETE entry itself was not flushed"
    published = next(i for i in moves if events[i][1] == tmp_path / "step-6")
    latest = next(i for i in moves if events[i][1] == tmp_path / LATEST)
    assert complete < published < latest
    assert ("fsync", tmp_path) in events[published + 1:latest], "step-6's new entry was not flushed before latest"
    assert ("fsync", tmp_path) in events[latest + 1:], "latest's new entry was not flushed"


def test_prune_removes_what_interrupted_saves_left(tmp_path):
    finished(tmp_path, 4, 6)
    for leftover in ("step-8.saving", "step-2.replaced"):
        (tmp_path / leftover).mkdir()
    prune(tmp_path, 2, latest=tmp_path / "step-6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]


def test_a_prune_cut_short_leaves_no_directory_that_looks_complete(tmp_path, monkeypatch):
    finished(tmp_path, 4, 6, 8)
    (tmp_path / "step-4" / "optim_states.pt").write_text("weights")

    def removing_one_file(path, **kwargs):
        if (path / "optim_states.pt").exists():
            (path / "optim_states.pt").unlink()
        raise Crash("killed mid-removal")

    monkeypatch.setattr(shutil, "rmtree", removing_one_file)
    with pytest.raises(Crash):
        prune(tmp_path, 2, latest=tmp_path / "step-8")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-6", "step-8"]


def saved_with(root, cfg: dict, lengths, step=6, layout=LAYOUT) -> Path:
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    record = {"step": step, "layout": layout._asdict(), "data_order": DataOrder.of(cfg, lengths)._asdict()}
    (path / COMPLETE).write_text(json.dumps(record))
    return path


def test_a_resume_with_another_data_order_is_refused_naming_the_option(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n" * 3)
    cfg = TrainConfig.from_flat(data=str(data), grad_accum=2, seed=3).flat()
    step = saved_with(tmp_path, cfg, [5, 7, 3])
    assert check_data_order(step, DataOrder.of(cfg, [5, 7, 3]), LAYOUT) is None
    with pytest.raises(CheckpointError, match=r"--grad-accum was 2 when step-6 was saved, now 4: .*Resume with "
                                              r"--grad-accum 2, or start a new run"):
        check_data_order(step, DataOrder.of(dict(cfg, grad_accum=4), [5, 7, 3]), LAYOUT)
    with pytest.raises(CheckpointError, match=r"--packing was true when step-6 was saved, now false; --seed was 3 "
                                              r"when step-6 was saved, now 4: .*Resume with --packing true --seed 3,"):
        check_data_order(step, DataOrder.of(dict(cfg, packing=False, seed=4), [5, 7, 3]), LAYOUT)
    for option, value in (("max_tokens_per_batch", 8192), ("shuffle_buffer", 10)):
        with pytest.raises(CheckpointError, match=f"--{option.replace('_', '-')} was "):
            check_data_order(step, DataOrder.of(dict(cfg, **{option: value}), [5, 7, 3]), LAYOUT)


def test_another_number_of_processes_resumes_where_a_step_takes_as_many_micro_batches(tmp_path):
    """Saved by one process with --grad-accum 4: the same examples come next where processes x --grad-accum is 4;
    otherwise the error names the --grad-accum that keeps it, or the process counts that can."""
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n" * 3)
    cfg = TrainConfig.from_flat(data=str(data), grad_accum=4).flat()
    step = saved_with(tmp_path, cfg, [5, 7, 3])
    two, three = LAYOUT._replace(processes=2), LAYOUT._replace(processes=3)
    assert check_data_order(step, DataOrder.of(dict(cfg, grad_accum=2), [5, 7, 3]), two) is None
    with pytest.raises(CheckpointError, match=r"step-6 was saved by 1 process\(es\) with --grad-accum 4, 4 "
                                              r"micro-batches a step; 2 process\(es\) with --grad-accum 4 take 8: "
                                              r"its steps would "
                                              r"train other examples. Resume with --grad-accum 2 \(2 x 2 = 4\)"):
        check_data_order(step, DataOrder.of(cfg, [5, 7, 3]), two)
    with pytest.raises(CheckpointError, match=r"no --grad-accum makes 4 at 3 process\(es\). Resume at a number of "
                                              r"processes dividing 4 \(1, 2, 4\)"):
        check_data_order(step, DataOrder.of(dict(cfg, grad_accum=1), [5, 7, 3]), three)


def test_another_sp_size_resumes_where_rows_and_steps_keep_their_size(tmp_path):
    """Saved by 4 processes at --sp-size 2 (2 data-parallel ranks, rows of 2 x 128 tokens, 2 micro-batches each a
    step): 2 processes without SP with rows of 256 and --grad-accum 2, or 8 processes at --sp-size 4 with rows of 4 x 64
    and --grad-accum 2, train the same rows in the same steps; another row size or step size is refused naming the
    value that keeps it. The layout itself (processes, --sp-size) needs no check of its own."""
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n" * 3)
    cfg = TrainConfig.from_flat(data=str(data), grad_accum=2, max_tokens_per_batch=128).flat()
    saved = Layout(processes=4, ep_size=2, lora=False, sp_size=2)
    step = saved_with(tmp_path, cfg, [5, 7, 3], layout=saved)
    plain, sp4 = Layout(processes=2, ep_size=2, lora=False), Layout(processes=8, ep_size=2, lora=False, sp_size=4)
    for layout, tokens in ((plain, 256), (sp4, 64), (saved, 128)):
        check_layout(step, layout)
        assert check_data_order(step, DataOrder.of(dict(cfg, max_tokens_per_batch=tokens), [5, 7, 3]), layout) is None
    with pytest.raises(CheckpointError, match=r"step-6 packed rows of 256 tokens \(--max-tokens-per-batch 128 x "
                                              r"--sp-size 2\); this run's rows hold 128 \(--max-tokens-per-batch 128 x "
                                              r"--sp-size 1\): .*Resume with --max-tokens-per-batch 256"):
        check_data_order(step, DataOrder.of(cfg, [5, 7, 3]), plain)
    with pytest.raises(CheckpointError, match=r"saved by 4 process\(es\) at --sp-size 2 \(2 data-parallel ranks\) "
                                              r"with --grad-accum 2, 4 micro-batches a step; 4 process\(es\) with "
                                              r"--grad-accum 2 take 8: .*Resume with --grad-accum 1 \(4 x 1 = 4\)"):
        check_data_order(step, DataOrder.of(dict(cfg, max_tokens_per_batch=256), [5, 7, 3]),
                         plain._replace(processes=4))
    with pytest.raises(CheckpointError, match=r"no --grad-accum makes 4 at 3 data-parallel ranks. Resume at a "
                                              r"number of data-parallel ranks \(processes / --sp-size\) dividing 4 "
                                              r"\(1, 2, 4\)"):
        check_data_order(step, DataOrder.of(dict(cfg, max_tokens_per_batch=64), [5, 7, 3]),
                         Layout(processes=12, ep_size=2, lora=False, sp_size=4))
    with pytest.raises(CheckpointError, match=r"Resume at an --sp-size dividing 256"):
        check_data_order(step, DataOrder.of(cfg, [5, 7, 3]), sp4._replace(processes=6, sp_size=3))
    # at the same --sp-size the row size is the option itself, named as any other
    with pytest.raises(CheckpointError, match=r"--max-tokens-per-batch was 128 when step-6 was saved, now 64"):
        check_data_order(step, DataOrder.of(dict(cfg, max_tokens_per_batch=64), [5, 7, 3]),
                         saved._replace(processes=8))


def test_a_tokenisation_option_is_named_when_it_changed_the_examples(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n" * 3)
    cfg = TrainConfig.from_flat(data=str(data), max_seq_len=512).flat()
    step = saved_with(tmp_path, cfg, [5, 700, 3])
    with pytest.raises(CheckpointError, match="--max-seq-len was 512 when step-6 was saved, now 256"):
        check_data_order(step, DataOrder.of(dict(cfg, max_seq_len=256), [5, 3]), LAYOUT)
    # no example was as long as either limit: the plan is the same, so the resume goes on
    assert check_data_order(step, DataOrder.of(dict(cfg, max_seq_len=1024), [5, 700, 3]), LAYOUT) is None


def test_other_data_is_refused_naming_what_differs(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n" * 3)
    cfg = TrainConfig.from_flat(data=str(data)).flat()
    step = saved_with(tmp_path, cfg, [5, 7, 3])
    # the same file and count with other lengths at the same places (another tokenizer, say)
    with pytest.raises(CheckpointError, match=r"\(the examples' lengths in tokens differ\)"):
        check_data_order(step, DataOrder.of(cfg, [7, 5, 3]), LAYOUT)
    data.write_text("{}\n" * 4)
    with pytest.raises(CheckpointError, match=rf"training data is not the data step-6 was saved with \(3 examples "
                                              rf"then, 4 now; {data} 9 bytes then, 12 bytes now\)"):
        check_data_order(step, DataOrder.of(cfg, [5, 7, 3, 4]), LAYOUT)
    other = tmp_path / "other.jsonl"
    other.write_text("{}\n" * 3)
    with pytest.raises(CheckpointError, match=rf"--data was {data} when step-6 was saved, now {other}"):
        check_data_order(step, DataOrder.of(dict(cfg, data=str(other)), [6, 6, 6]), LAYOUT)


def test_a_checkpoint_without_a_data_order_resumes_with_a_note(tmp_path):
    step = tmp_path / "step-6"
    step.mkdir()
    (step / COMPLETE).write_text(json.dumps({"step": 6, "layout": LAYOUT._asdict()}))
    note = check_data_order(step, ORDER, LAYOUT)
    assert "was saved before checkpoints recorded their data order" in note and "--grad-accum" in note
    (step / COMPLETE).write_text("6\n")
    assert check_data_order(step, ORDER, LAYOUT) is not None


def test_a_resume_with_another_schedule_or_adamw_setting_is_refused_naming_them(tmp_path):
    """Saved by save() with a 100-step cosine schedule at --lr 0.0001: the loaded state would keep that lr and
    AdamW's settings while the schedule's length came from the new options."""
    path = save_step(tmp_path, 6, FakeEngine("w"))
    cfg = TrainConfig().flat()
    check_schedule(path, Schedule.of(cfg, 100))
    check_schedule(path, Schedule.of(dict(cfg, grad_clip=0.5), 100))  # read from the options every step: resumes
    with pytest.raises(CheckpointError, match=r"--lr was 0.0001 when step-6 was saved, now 0.001; its cosine schedule "
                                              r"spanned 100 steps, now 300 \(--max-steps, or --epochs\): .* Resume "
                                              r"with --lr 0.0001 --max-steps 100, or start a new run"):
        check_schedule(path, Schedule.of(dict(cfg, lr=1e-3), 300))
    with pytest.raises(CheckpointError, match=r"--weight-decay was 0.0 when step-6 was saved, now 0.1.*Resume with "
                                              r"--weight-decay 0.0,"):
        check_schedule(path, Schedule.of(dict(cfg, weight_decay=0.1), 100))


def test_a_constant_schedule_resumes_at_another_length(tmp_path):
    """After its warmup a constant schedule's lr does not depend on the run's length, nor on --min-lr-ratio."""
    path = tmp_path / "step-6"
    path.mkdir()
    constant = dict(TrainConfig().flat(), lr_schedule="constant")
    (path / COMPLETE).write_text(json.dumps({"step": 6, "schedule": Schedule.of(constant, 100)._asdict()}))
    check_schedule(path, Schedule.of(dict(constant, min_lr_ratio=0.5), 300))
    with pytest.raises(CheckpointError, match="--lr-schedule was constant when step-6 was saved, now cosine"):
        check_schedule(path, Schedule.of(dict(constant, lr_schedule="cosine"), 100))
    (path / COMPLETE).write_text("6\n")  # a marker from before schedules were recorded: nothing to check against
    check_schedule(path, Schedule.of(TrainConfig().flat(), 7))
