"""Micro-batches: packed rows of whole documents (varlen attention) or padded batches.

Planning works on example lengths only and is deterministic under (seed, epoch), so every rank
plans the same batches and a resumed run replans exactly what it had.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .rows import IGNORE, DataError


def _first_fit_decreasing(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _padded_batches(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Consecutive examples while batch size x longest example fits the token budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in indices:
        if current and (len(current) + 1) * max(longest, lengths[i]) > capacity:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def plan_micro_batches(lengths: list[int], capacity: int, *, packing: bool, seed: int, epoch: int,
                       shuffle_buffer: int) -> list[list[int]]:
    """Example indices of each micro-batch of one epoch, at most `capacity` tokens each."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise DataError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the micro-batch "
                        f"capacity {capacity}; raise --max-tokens-per-batch (or lower --max-seq-len)")
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not packing:
        return _padded_batches(order, lengths, capacity)
    batches: list[list[int]] = []
    for start in range(0, len(order), shuffle_buffer):
        window = _first_fit_decreasing(order[start:start + shuffle_buffer], lengths, capacity)
        rng.shuffle(window)
        batches.extend(window)
    return batches


def packing_efficiency(batches: list[list[int]], lengths: list[int], capacity: int) -> float:
    return sum(lengths[i] for b in batches for i in b) / (capacity * max(len(batches), 1))


@dataclass
class MicroBatch:
    """Model inputs of one micro-batch and what the metrics need of it. A sequence shard (sequence_shard) holds
    slice `part` of `parts` of a packed row; its doc_lengths are the row's documents, its counts its own share, so
    that sums over the ranks of an SP group count each token and document once."""
    inputs: dict[str, torch.Tensor | int]
    shift_labels: torch.Tensor
    doc_lengths: list[int]
    shard: tuple[int, int] = (0, 1)  # (part, parts)

    @property
    def num_tokens(self) -> int:
        """Real tokens this rank runs: a shard's slice of the row's, which lead the row (padding follows them)."""
        part, parts = self.shard
        if parts == 1:
            return sum(self.doc_lengths)
        width = self.inputs["input_ids"].shape[1]
        return min(max(sum(self.doc_lengths) - part * width, 0), width)

    @property
    def context_sum(self) -> float:
        """Sum over real tokens of the tokens each attends to (FLOPs); a shard's equal share of its row's, as every
        rank of an SP group attends over the whole row for its share of the heads."""
        return sum(n * (n + 1) / 2 for n in self.doc_lengths) / self.shard[1]

    @property
    def num_label_tokens(self) -> int:
        return int((self.shift_labels != IGNORE).sum())

    def to(self, device) -> "MicroBatch":
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return MicroBatch(inputs, self.shift_labels.to(device), self.doc_lengths, self.shard)


def _shift(labels: list[int]) -> list[int]:
    """Next-token targets of one document; its last position predicts nothing."""
    return labels[1:] + [IGNORE]


def collate_packed(examples: list[dict]) -> MicroBatch:
    """One row of documents; each keeps positions from 0 and attends only to itself (cu_seqlens)."""
    ids, labels, positions, lengths = [], [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        ids += ex["input_ids"]
        labels += _shift(ex["labels"])
        positions += range(n)
        lengths.append(n)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    inputs = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    return MicroBatch(inputs, torch.tensor([labels]), lengths)


def collate_padded(examples: list[dict], pad_id: int) -> MicroBatch:
    """Right-padded to the longest example; padding is masked out of attention and labels."""
    longest = max(len(ex["input_ids"]) for ex in examples)
    ids, labels, mask = [], [], []
    for ex in examples:
        pad = longest - len(ex["input_ids"])
        ids.append(ex["input_ids"] + [pad_id] * pad)
        labels.append(_shift(ex["labels"]) + [IGNORE] * pad)
        mask.append([1] * len(ex["input_ids"]) + [0] * pad)
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    return MicroBatch(inputs, torch.tensor(labels), [len(ex["input_ids"]) for ex in examples])


def filler_batch(pad_id: int, packing: bool) -> MicroBatch:
    """A one-token batch without labels: keeps a rank in step (EP all-to-all) when data runs out."""
    example = {"input_ids": [pad_id], "labels": [IGNORE]}
    batch = collate_packed([example]) if packing else collate_padded([example], pad_id)
    return MicroBatch(batch.inputs, batch.shift_labels, [0])


def sequence_shard(batch: MicroBatch, part: int, parts: int, pad_id: int) -> MicroBatch:
    """Slice `part` of `parts` equal slices of the packed row `batch` (Ulysses sequence parallelism): the row
    padded to a multiple of `parts` tokens by a padding document (no labels), input_ids, position_ids and the
    next-token targets (shifted within each document before the split, so a slice's last token keeps its target in
    the next slice) cut to the slice; cu_seq_lens and max_length stay the whole row's, which the attention sees
    whole."""
    ids, positions, labels = batch.inputs["input_ids"], batch.inputs["position_ids"], batch.shift_labels
    length = ids.shape[1]
    pad = -length % parts
    cu, longest = batch.inputs["cu_seq_lens_q"], batch.inputs["max_length_q"]
    if pad:
        ids = torch.cat([ids, ids.new_full((1, pad), pad_id)], dim=1)
        positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype)[None]], dim=1)
        labels = torch.cat([labels, labels.new_full((1, pad), IGNORE)], dim=1)
        cu = torch.cat([cu, cu.new_tensor([length + pad])])
        longest = max(longest, pad)
    width = (length + pad) // parts
    cut = slice(part * width, (part + 1) * width)
    inputs = {"input_ids": ids[:, cut], "position_ids": positions[:, cut], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
              "max_length_q": longest, "max_length_k": longest}
    return MicroBatch(inputs, labels[:, cut], batch.doc_lengths, (part, parts))
