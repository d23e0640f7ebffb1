"""DeepSpeed checkpoints that resume exactly, at the layout they were saved with or another, and that an interrupted
save never spoils.

Layout: OUTPUT_DIR/checkpoints/step-N/ holds DeepSpeed's files (model, optimizer, scheduler; expert
shards per EP rank), our per-rank RNG states and, written last, a COMPLETE marker (JSON: the step, the
layout it was saved with: processes, EP size, LoRA or not, what decides its data order, and its learning-rate
schedule and AdamW settings). A save is
written into step-N.saving, flushed to disk (every file, then the directory) and marked COMPLETE before
it is renamed to step-N; a step-N already there (a run resumed from an earlier checkpoint saves its steps
again) is renamed aside first and removed only after. The pointer file `latest` is replaced atomically
after that, so a crash at any point leaves `latest` naming a complete checkpoint: between the two renames
it resolves to step-N.saving.

The data position is the step: batches are planned deterministically from (seed, epoch), so a resume checks,
before any weight is loaded, that the options and the data that decide which examples a step trains on are
those the checkpoint was saved with (DataOrder). A step takes processes x --grad-accum micro-batches of the plan:
at another number of processes the same examples come next when that product is the same. The lr schedule and
AdamW's settings must be those it was saved with too (Schedule): the loaded state keeps the saved peak lr and AdamW
settings, while the schedule's shape comes from the options.

Another layout (number of processes, EP size): a full fine-tuning checkpoint resumes through DeepSpeed's universal
checkpoint (deepspeed.checkpoint.ds_to_universal: every parameter's fp32 master weight and Adam moments whole, the
experts consolidated over EP ranks), converted once into step-N/universal by the first such resume and loaded with
the engine's universal path; the fast path's bf16 moments are widened to fp32 for the conversion (its AutoEP
consolidation takes fp32 alone) and narrowed again after the load, and its gate/up mirror is rebuilt. The RNG
states are per rank, so they are restored at the same layout only (nothing a step draws depends on them).

LoRA runs write, in place of DeepSpeed's files, one file per rank with a layout-free share of the trainable
weights: each LoRA factor's fp32 master weight and Adam moments whole, an expert factor as the block of experts
this rank holds (ranks of EP group 0 write the experts, rank 0 the rest), with the scheduler. Any layout reads
them back: DeepSpeed's AutoEP checkpoint code reads the plain expert weights of each MoE block, which LoRA wraps,
and the frozen base needs no saving.
"""

from .files import complete_checkpoints, prune, resolve
from .layout import (COMPLETE, LATEST, UNIVERSAL, CheckpointError, DataOrder, Layout, Schedule, check_data_order,
                     check_layout, check_schedule, data_fingerprint, saved_layout)
from .save_load import load, save
from .universal import universal

__all__ = ["COMPLETE", "CheckpointError", "DataOrder", "LATEST", "Layout", "Schedule", "UNIVERSAL", "check_data_order",
           "check_layout", "check_schedule", "complete_checkpoints", "data_fingerprint", "load", "prune", "resolve",
           "save", "saved_layout", "universal"]
