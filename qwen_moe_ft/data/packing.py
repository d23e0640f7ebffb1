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
    """Model inputs of one micro-batch and what the metrics need of it."""
    inputs: dict[str, torch.Tensor | int]
    shift_labels: torch.Tensor
    doc_lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.doc_lengths)

    @property
    def num_label_tokens(self) -> int:
        return int((self.shift_labels != IGNORE).sum())

    def to(self, device) -> "MicroBatch":
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return MicroBatch(inputs, self.shift_labels.to(device), self.doc_lengths)


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
