"""StepLoader: which micro-batches each rank runs at each step, across ranks, accumulation and epochs."""
import math
from collections import Counter

import datasets
import pytest
import torch

from qwen_moe_ft.data import loader as loader_module
from qwen_moe_ft.data.loader import StepLoader
from qwen_moe_ft.data.packing import plan_micro_batches

# Epochs of these lengths plan to different numbers of micro-batches under seed 1 (see the first test), with
# later epochs longer than the first: a loader that gave every epoch the first one's steps would drop data.
LENGTHS = [19, 2, 14, 17, 4, 26, 25, 9, 6, 30, 1, 16, 2, 5, 11, 26, 23, 5, 26, 2, 16, 18, 28, 7, 18, 8, 32, 20, 9, 20]
CAPACITY, SEED, PAD = 32, 1, 0
SHUFFLE_BUFFER = {True: 5, False: 100}  # packing: a small window, so the bins differ from epoch to epoch


def _dataset():
    # token ids encode the example index, so a batch tells which examples it holds
    return datasets.Dataset.from_dict({"input_ids": [[100 + i] * n for i, n in enumerate(LENGTHS)],
                                       "labels": [[100 + i] * n for i, n in enumerate(LENGTHS)]})


def _loader(rank, world_size=2, grad_accum=2, packing=True, dataset=None, sp_size=1):
    return StepLoader(dataset or _dataset(), capacity=CAPACITY, packing=packing, seed=SEED,
                      shuffle_buffer=SHUFFLE_BUFFER[packing], world_size=world_size, rank=rank,
                      grad_accum=grad_accum, pad_id=PAD, sp_size=sp_size)


def _plan(epoch, packing=True):
    return plan_micro_batches(LENGTHS, CAPACITY, packing=packing, seed=SEED, epoch=epoch,
                              shuffle_buffer=SHUFFLE_BUFFER[packing])


def _examples(batch):
    ids = batch.inputs["input_ids"].flatten().tolist()
    return sorted({i - 100 for i in ids if i >= 100})


@pytest.fixture
def planned_epochs(monkeypatch):
    """The epochs the loaders ask the planner for, one entry a call."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["epoch"])
        return plan_micro_batches(*args, **kwargs)

    monkeypatch.setattr(loader_module, "plan_micro_batches", counting)
    return calls


@pytest.mark.parametrize("packing", [True, False])
def test_the_data_plans_epochs_of_different_lengths(packing):
    lengths = [len(_plan(epoch, packing)) for epoch in (1, 2, 3)]
    assert lengths == ([16, 18, 18] if packing else [22, 25, 25])


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("packing", [True, False])
def test_every_example_once_in_each_of_three_epochs_each_planned_once(packing, world_size, grad_accum,
                                                                     planned_epochs):
    dataset = _dataset()
    loaders = [_loader(rank, world_size, grad_accum, packing, dataset) for rank in range(world_size)]
    per_step = world_size * grad_accum
    total = loaders[0].total_steps(3)
    assert total == sum(math.ceil(len(_plan(epoch, packing)) / per_step) for epoch in (1, 2, 3))
    seen = {1: [], 2: [], 3: []}
    fillers = Counter()
    for step in range(total):
        for loader in loaders:
            batches = loader.step(step)
            assert len(batches.micro_batches) == grad_accum
            for micro in batches.micro_batches:
                examples = _examples(micro)
                fillers[batches.epoch] += not examples
                seen[batches.epoch] += examples
    for epoch in (1, 2, 3):
        assert sorted(seen[epoch]) == list(range(len(LENGTHS))), epoch  # each once: none dropped, none twice
        # only the epoch's last step runs label-free fillers, on the ranks past the plan's end
        assert fillers[epoch] == loaders[0].steps_in_epoch(epoch) * per_step - len(_plan(epoch, packing))
    assert Counter(planned_epochs) == {1: world_size, 2: world_size, 3: world_size}  # once per loader and epoch


def test_rank_takes_its_own_consecutive_micro_batches_of_the_plan():
    plan = _plan(1)
    for rank in range(2):
        batches = _loader(rank).step(0).micro_batches
        assert [_examples(b) for b in batches] == [sorted(plan[rank * 2 + k]) for k in range(2)]


def test_a_steps_epoch_and_place_follow_the_step_counts_of_the_epochs_before_it():
    loader = _loader(0)  # 4 micro-batches a step: epochs of 16, 18, 18 micro-batches take 4, 5, 5 steps
    assert [loader.steps_in_epoch(epoch) for epoch in (1, 2, 3)] == [4, 5, 5]
    assert [loader.position(step) for step in (0, 3, 4, 8, 9, 13, 14)] == \
        [(1, 0), (1, 3), (2, 0), (2, 4), (3, 0), (3, 4), (4, 0)]  # past --epochs (--max-steps) epoch 4 follows
    third = loader.step(9)
    assert third.epoch == 3
    assert [_examples(b) for b in third.micro_batches] == [sorted(_plan(3)[0]), sorted(_plan(3)[1])]


def test_run_length_over_whole_and_fractional_epochs():
    loader = _loader(0)  # steps per epoch 4, 5, 5
    assert loader.total_steps(1) == 4
    assert loader.total_steps(0.5) == 2
    assert loader.total_steps(2.5) == 4 + 5 + 3  # ceil(2.5): the half epoch rounds up
    assert loader.total_steps(3) == 14
    assert [loader.epoch_steps(steps) for steps in (4, 5, 10, 14)] == [[4], [4, 5], [4, 5, 5], [4, 5, 5]]


def test_a_resumed_run_gets_the_same_batches_and_plans_each_epoch_once(planned_epochs):
    loader = _loader(0)
    expected = [b.inputs["input_ids"].tolist() for b in loader.step(11).micro_batches]
    planned_epochs.clear()
    resumed = _loader(0)  # a fresh process asks for a step of epoch 3 first
    again = [b.inputs["input_ids"].tolist() for s in range(11, 14) for b in resumed.step(s).micro_batches]
    assert again[:2] == expected
    assert sorted(planned_epochs) == [1, 2, 3]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_an_sp_group_takes_the_micro_batches_of_one_data_parallel_rank_each_rank_its_slice(grad_accum):
    """4 ranks at SP=2: ranks 2k and 2k+1 run data-parallel rank k of 2 (its rows and fillers, step for step), each
    the part of every row its place in the group names."""
    dataset = _dataset()
    sharded = [_loader(rank, 4, grad_accum, dataset=dataset, sp_size=2) for rank in range(4)]
    plain = [_loader(rank, 2, grad_accum, dataset=dataset) for rank in range(2)]
    assert sharded[0].total_steps(2) == plain[0].total_steps(2)
    for step in range(plain[0].total_steps(2)):
        for dp_rank, loader in enumerate(plain):
            rows = loader.step(step).micro_batches
            parts = [sharded[2 * dp_rank + part].step(step).micro_batches for part in range(2)]
            for k, row in enumerate(rows):
                assert [p[k].shard for p in parts] == [(0, 2), (1, 2)]
                ids = torch.cat([p[k].inputs["input_ids"] for p in parts], dim=1)[0].tolist()
                assert ids[:row.inputs["input_ids"].shape[1]] == row.inputs["input_ids"][0].tolist()
                assert sum(p[k].num_tokens for p in parts) == row.num_tokens
