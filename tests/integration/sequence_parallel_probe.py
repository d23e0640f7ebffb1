"""qwen_moe_ft/train.py with a probe, for tests/integration/test_sequence_parallel.py (launched by torchrun in its
place), at any --sp-size.

Before each optimizer step it runs the step's micro-batches once more without gradient and records the per-token
losses of each whole row (an SP group's ranks gather their slices; the row's padding left off), and after the
backward, before the step, every trainable parameter's gradient (tests/integration/probed_train.py's reading).
Written to OUTPUT_DIR/sp-probe-rank{rank}.pt when the run ends, with each row's document lengths."""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import groups

from probed_train import run_probed
from qwen_moe_ft.config import load_config
from qwen_moe_ft.data.rows import IGNORE
from qwen_moe_ft.model.loading import causal_lm_of
from qwen_moe_ft.train import Trainer


@torch.no_grad()
def _row_losses(trainer, micro) -> torch.Tensor:
    """Next-token losses of every token of the micro-batch's whole row (0 where it has no target)."""
    micro = micro.to(trainer.device)
    logits = causal_lm_of(trainer.engine).lm_head(
        causal_lm_of(trainer.engine).model(**micro.inputs, use_cache=False).last_hidden_state).float()
    losses = F.cross_entropy(logits[0], micro.shift_labels[0], ignore_index=IGNORE, reduction="none")
    if trainer.sp_size > 1:
        parts = [torch.empty_like(losses) for _ in range(trainer.sp_size)]
        dist.all_gather(parts, losses, group=groups.mpu.get_sequence_parallel_group())
        losses = torch.cat(parts)
    return losses[:micro.inputs["cu_seq_lens_q"][len(micro.doc_lengths)]].cpu()


def main(argv: list[str]) -> None:
    trainer = Trainer(load_config(argv))
    record = {"rows": [], "losses": [], "grads": []}

    def record_rows(micro_batches):
        trainer.engine.eval()
        record["losses"].append([_row_losses(trainer, micro) for micro in micro_batches])
        trainer.engine.train()
        record["rows"].append([micro.doc_lengths for micro in micro_batches])

    run_probed(trainer, record, record_rows, f"sp-probe-rank{trainer.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
