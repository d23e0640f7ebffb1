import pytest
import torch

from qwen_moe_ft.data.rows import IGNORE, DataError
from qwen_moe_ft.data.packing import (collate_packed, collate_padded, filler_batch, packing_efficiency,
                                 plan_micro_batches, sequence_shard)

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


def test_sequence_shards_split_the_row_padded_to_their_number_and_keep_its_documents_whole():
    """Three tokens each of a 5-token row padded by a 1-token document: shifted labels cut as they are (token 2's
    target stays IGNORE, the document's end), cu_seq_lens the whole row's; counts add up to the row's."""
    row = collate_packed(_examples())
    shards = [sequence_shard(row, part, 2, pad_id=0) for part in range(2)]
    assert [s.inputs["input_ids"].tolist() for s in shards] == [[[10, 11, 12]], [[20, 21, 0]]]
    assert [s.inputs["position_ids"].tolist() for s in shards] == [[[0, 1, 2]], [[0, 1, 0]]]
    assert [s.shift_labels.tolist() for s in shards] == [[[11, 12, IGNORE]], [[21, IGNORE, IGNORE]]]
    for shard in shards:
        assert shard.inputs["cu_seq_lens_q"].tolist() == shard.inputs["cu_seq_lens_k"].tolist() == [0, 3, 5, 6]
        assert shard.inputs["max_length_q"] == shard.inputs["max_length_k"] == 3
        assert shard.doc_lengths == [3, 2]
    assert [s.num_tokens for s in shards] == [3, 2]
    assert sum(s.num_label_tokens for s in shards) == row.num_label_tokens == 3
    assert sum(s.context_sum for s in shards) == row.context_sum == 3 * 4 / 2 + 2 * 3 / 2


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_sequence_shards_concatenate_to_the_padded_row(parts):
    """A 13-token document spans the shards; the padding (IGNORE targets, its own positions) follows the tokens."""
    examples = [{"input_ids": list(range(100, 113)), "labels": list(range(100, 113))},
                {"input_ids": [7, 8, 9, 10], "labels": [IGNORE, IGNORE, 9, 10]}]
    row = collate_packed(examples)
    shards = [sequence_shard(row, part, parts, pad_id=0) for part in range(parts)]
    pad = -17 % parts
    joined = {key: torch.cat([s.inputs[key] for s in shards], dim=1)[0].tolist() for key in ("input_ids",
                                                                                           "position_ids")}
    assert joined["input_ids"] == row.inputs["input_ids"][0].tolist() + [0] * pad
    assert joined["position_ids"] == row.inputs["position_ids"][0].tolist() + list(range(pad))
    labels = torch.cat([s.shift_labels for s in shards], dim=1)[0].tolist()
    assert labels == row.shift_labels[0].tolist() + [IGNORE] * pad
    assert {s.inputs["input_ids"].shape[1] for s in shards} == {(17 + pad) // parts}
    assert sum(s.num_tokens for s in shards) == 17
    assert sum(s.num_label_tokens for s in shards) == row.num_label_tokens


def test_a_filler_batch_shards_into_slices_without_tokens():
    shards = [sequence_shard(filler_batch(0, packing=True), part, 2, pad_id=0) for part in range(2)]
    assert [s.inputs["input_ids"].shape for s in shards] == [torch.Size([1, 1])] * 2
    assert [s.num_tokens for s in shards] == [0, 0] and [s.num_label_tokens for s in shards] == [0, 0]
