import pytest
import torch

from qwen_moe_ft.data.rows import IGNORE, DataError
from qwen_moe_ft.data.packing import (collate_packed, collate_padded, filler_batch, packing_efficiency,
                                 plan_micro_batches)

LENGTHS = [5, 17, 3, 30, 12, 8, 25, 1, 9, 14, 22, 6]


@pytest.mark.parametrize("packing", [True, False])
def test_plan_covers_every_example_once_within_capacity(packing):
    plan = plan_micro_batches(LENGTHS, 32, packing=packing, seed=0, epoch=1, shuffle_buffer=5)
    flat = sorted(i for batch in plan for i in batch)
    assert flat == list(range(len(LENGTHS)))
    for batch in plan:
        cost = sum(LENGTHS[i] for i in batch) if packing else len(batch) * max(LENGTHS[i] for i in batch)
        assert cost <= 32


def test_plan_is_deterministic_per_seed_and_epoch():
    kwargs = dict(packing=True, shuffle_buffer=100)
    a = plan_micro_batches(LENGTHS, 32, seed=1, epoch=1, **kwargs)
    assert a == plan_micro_batches(LENGTHS, 32, seed=1, epoch=1, **kwargs)
    assert a != plan_micro_batches(LENGTHS, 32, seed=1, epoch=2, **kwargs)


def test_packing_needs_fewer_batches_than_padding():
    lengths = [((i * 37) % 60) + 4 for i in range(200)]
    packed = plan_micro_batches(lengths, 256, packing=True, seed=0, epoch=1, shuffle_buffer=1000)
    padded = plan_micro_batches(lengths, 256, packing=False, seed=0, epoch=1, shuffle_buffer=1000)
    assert len(packed) < len(padded)
    assert packing_efficiency(packed, lengths, 256) > 0.95


def test_example_longer_than_capacity_is_an_error():
    # a DataError: the trainer prints it as one line (rank 0), not as a traceback per rank
    with pytest.raises(DataError, match="example 1 has 40 tokens.*raise --max-tokens-per-batch"):
        plan_micro_batches([10, 40], 32, packing=True, seed=0, epoch=1, shuffle_buffer=10)


def _examples():
    return [{"input_ids": [10, 11, 12], "labels": [IGNORE, 11, 12]},
            {"input_ids": [20, 21], "labels": [20, 21]}]


def test_collate_packed_resets_positions_and_never_labels_across_documents():
    batch = collate_packed(_examples())
    assert batch.inputs["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch.inputs["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch.inputs["max_length_q"] == 3
    # Position 2 is the end of document 1: it must not predict document 2's first token (20).
    assert batch.shift_labels.tolist() == [[11, 12, IGNORE, 21, IGNORE]]
    assert batch.num_tokens == 5 and batch.num_label_tokens == 3


def test_collate_padded_masks_padding_from_attention_and_labels():
    batch = collate_padded(_examples(), pad_id=0)
    assert batch.inputs["input_ids"].tolist() == [[10, 11, 12], [20, 21, 0]]
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.shift_labels.tolist() == [[11, 12, IGNORE], [21, IGNORE, IGNORE]]
    assert batch.num_tokens == 5 and batch.num_label_tokens == 3


@pytest.mark.parametrize("packing", [True, False])
def test_filler_batch_counts_nothing(packing):
    batch = filler_batch(0, packing)
    assert batch.num_tokens == 0 and batch.num_label_tokens == 0
    assert torch.equal(batch.inputs["input_ids"], torch.tensor([[0]]))
