"""StepLoader: which micro-batches each rank runs at each step, across ranks, accumulation and epochs."""
import datasets
import pytest

from qwen_moe_ft.data.loader import StepLoader
from qwen_moe_ft.data.packing import plan_micro_batches

LENGTHS = [5, 17, 3, 30, 12, 8, 25, 1, 9, 14, 22, 6, 11]
PAD = 0


def _dataset():
    # token ids encode the example index, so a batch tells which examples it holds
    return datasets.Dataset.from_dict({"input_ids": [[100 + i] * n for i, n in enumerate(LENGTHS)],
                                       "labels": [[100 + i] * n for i, n in enumerate(LENGTHS)]})


def _loader(rank, world_size=2, grad_accum=2, packing=True):
    return StepLoader(_dataset(), capacity=32, packing=packing, seed=3, shuffle_buffer=100, world_size=world_size,
                      rank=rank, grad_accum=grad_accum, pad_id=PAD)


def _examples(batch):
    ids = batch.inputs["input_ids"].flatten().tolist()
    return sorted({i - 100 for i in ids if i >= 100})


@pytest.mark.parametrize("packing", [True, False])
def test_every_example_once_per_epoch_over_ranks_and_steps(packing):
    loaders = [_loader(rank, packing=packing) for rank in range(2)]
    plan = plan_micro_batches(LENGTHS, 32, packing=packing, seed=3, epoch=1, shuffle_buffer=100)
    steps = loaders[0].steps_per_epoch
    assert steps == -(-len(plan) // 4)  # ceil: 2 ranks x 2 micro-batches a step
    seen, fillers = [], 0
    for step in range(steps):
        for loader in loaders:
            batches = loader.step(step)
            assert batches.epoch == 1 and len(batches.micro_batches) == 2
            for micro in batches.micro_batches:
                examples = _examples(micro)
                fillers += not examples
                seen += examples
    assert sorted(seen) == list(range(len(LENGTHS)))
    assert fillers == 4 * steps - len(plan)  # past the plan's end a rank runs a label-free filler


def test_rank_takes_its_own_consecutive_micro_batches_of_the_plan():
    plan = plan_micro_batches(LENGTHS, 32, packing=True, seed=3, epoch=1, shuffle_buffer=100)
    for rank in range(2):
        batches = _loader(rank).step(0).micro_batches
        assert [_examples(b) for b in batches] == [sorted(plan[rank * 2 + k]) for k in range(2)]


def test_steps_past_an_epoch_start_the_next_epochs_plan_deterministically():
    loader = _loader(0)
    steps = loader.steps_per_epoch
    second = loader.step(steps)
    assert second.epoch == 2
    plan2 = plan_micro_batches(LENGTHS, 32, packing=True, seed=3, epoch=2, shuffle_buffer=100)
    assert [_examples(b) for b in second.micro_batches] == [sorted(plan2[0]), sorted(plan2[1])]
    # a resumed run asks for the same step afresh and gets the same batches
    again = _loader(0).step(steps)
    assert [b.inputs["input_ids"].tolist() for b in again.micro_batches] == \
        [b.inputs["input_ids"].tolist() for b in second.micro_batches]
