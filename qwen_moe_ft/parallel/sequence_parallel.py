"""Sequence parallelism through DeepSpeed Ulysses (`deepspeed.runtime.sequence_parallel.ulysses_sp`).

Each packed row is split over `--sp-size` consecutive ranks (an SP group), every rank holding a contiguous slice of
its tokens (data/packing.py's sequence_shard). Everything but attention is per token and runs on the slice as it
is; DeepSpeed's UlyssesSPAttentionHF wraps our registered varlen attention: an all-to-all turns [slice, all heads]
into [whole row, heads / SP], the varlen kernel attends over the whole row with the row's cu_seq_lens (which every
rank of the group holds whole), and a second all-to-all turns the result back. DeepSpeed's ZeRO then reduces the
dense gradients over all ranks and the expert gradients over each expert's data-parallel group, as without SP: the
loss of every rank is a share of one sum normalised by the global label count, so the sums are the gradient.
"""
from __future__ import annotations

from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from deepspeed.utils import groups


def enable_ulysses(model, attn_implementation: str, sp_size: int) -> None:
    """Wrap `attn_implementation` (registered in transformers' attention interface, the model's) in DeepSpeed's
    Ulysses attention and create the SP groups of `sp_size` consecutive ranks; before the engine is built.

    The engine would take these groups as `deepspeed.initialize(mpu=...)`, which Accelerate passes only for attention
    implementations on its own list (flash_attention_2/3, sdpa; ours are registered under names of their own).
    Given so, the engine would also record the SP size as its checkpoints' tensor-parallel degree (this mpu's
    get_model_parallel_world_size) and count processes / SP in train_batch_size. Put where the engine puts an mpu it
    is given (deepspeed.utils.groups.mpu), every group DeepSpeed reads is the same (ZeRO partitions and reduces over
    all ranks, the expert groups are those without SP) and checkpoints keep the layout of a run without SP.
    Evaluation runs sequence-parallel too (disable_in_eval False): its rows are split like the training rows.
    """
    groups.mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn_implementation, sequence_parallel_size=sp_size,
        micro_batch_size=1, seq_length_is_variable=True, disable_in_eval=False)
