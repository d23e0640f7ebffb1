"""Which micro-batches each rank runs at each optimizer step, epoch after epoch.

Step s of an epoch takes micro-batches [s*W*G, (s+1)*W*G) of the epoch's plan; rank r runs
G of them in a row. Past the end of the plan a rank gets filler batches, so that every rank
takes part in every step's collectives (the EP all-to-all) and no example is dropped.
With sequence parallelism (sp_size > 1) W is the number of SP groups (world size / sp_size): the
consecutive ranks of a group run the same micro-batches, each its slice of every row.
Epochs plan to different numbers of micro-batches (the shuffle changes what fits together),
so each epoch has its own step count and a run's steps follow one another through them.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import datasets

from .packing import MicroBatch, collate_packed, collate_padded, filler_batch, plan_micro_batches, sequence_shard


@dataclass
class StepBatches:
    epoch: int  # 1-based
    micro_batches: list[MicroBatch]


class StepLoader:
    def __init__(self, dataset: datasets.Dataset, *, capacity: int, packing: bool, seed: int, shuffle_buffer: int,
                 world_size: int, rank: int, grad_accum: int, pad_id: int, sp_size: int = 1):
        """capacity: tokens a micro-batch (a row with packing), before any split over an SP group."""
        if sp_size > 1 and not packing:
            raise ValueError("sequence parallelism splits packed rows")
        self.dataset = dataset
        self.lengths = [len(ids) for ids in dataset["input_ids"]]
        self.capacity, self.packing, self.seed, self.shuffle_buffer = capacity, packing, seed, shuffle_buffer
        # the data-parallel world: one rank per SP group
        self.world_size, self.rank = world_size // sp_size, rank // sp_size
        self.sp_size, self.sp_rank = sp_size, rank % sp_size
        self.grad_accum, self.pad_id = grad_accum, pad_id
        # Every epoch's plan is kept for the run (an index per example, small beside the tokens): a step of any
        # epoch needs the step counts of all epochs before it.
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int) -> list[list[int]]:
        """Example indices of each micro-batch of `epoch` (1-based), planned on first use only."""
        if epoch not in self._plans:
            self._plans[epoch] = plan_micro_batches(self.lengths, self.capacity, packing=self.packing,
                                                    seed=self.seed, epoch=epoch, shuffle_buffer=self.shuffle_buffer)
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(len(self.plan(epoch)) / (self.world_size * self.grad_accum))

    def total_steps(self, epochs: float) -> int:
        """Steps of `epochs` passes over the data: all steps of each whole epoch, then that fraction of the
        next epoch's steps."""
        whole = math.floor(epochs)
        steps = sum(self.steps_in_epoch(epoch) for epoch in range(1, whole + 1))
        fraction = epochs - whole
        return steps + (math.ceil(fraction * self.steps_in_epoch(whole + 1)) if fraction else 0)

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, 0-based step within it) of 0-based optimizer step `global_step`; past the last epoch of
        --epochs (a longer --max-steps) the next epochs follow."""
        epoch = 1
        while global_step >= (steps := self.steps_in_epoch(epoch)):
            global_step -= steps
            epoch += 1
        return epoch, global_step

    def epoch_steps(self, steps: int) -> list[int]:
        """Step counts of the epochs that a run of `steps` steps reaches (the last maybe in part)."""
        return [self.steps_in_epoch(epoch) for epoch in range(1, self.position(steps - 1)[0] + 1)]

    def _collate(self, indices: list[int]) -> MicroBatch:
        examples = [self.dataset[i] for i in indices]
        return collate_packed(examples) if self.packing else collate_padded(examples, self.pad_id)

    def _shard(self, batch: MicroBatch) -> MicroBatch:
        return sequence_shard(batch, self.sp_rank, self.sp_size, self.pad_id) if self.sp_size > 1 else batch

    def step(self, global_step: int) -> StepBatches:
        """Micro-batches of this rank for 0-based optimizer step `global_step` (deterministic, resumable)."""
        epoch, in_epoch = self.position(global_step)
        plan = self.plan(epoch)
        first = in_epoch * self.world_size * self.grad_accum + self.rank * self.grad_accum
        batches = [self._collate(plan[i]) if i < len(plan) else filler_batch(self.pad_id, self.packing)
                   for i in range(first, first + self.grad_accum)]
        return StepBatches(epoch, [self._shard(batch) for batch in batches])

    def epoch_batches(self) -> Iterator[list[MicroBatch]]:
        """One pass over the data (evaluation): this rank's micro-batches, grouped per step."""
        for step in range(self.steps_in_epoch(1)):
            yield self.step(step).micro_batches
