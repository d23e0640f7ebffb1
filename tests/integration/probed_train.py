"""qwen_moe_ft/train.py with a probe, for tests/integration/test_reference.py (launched by torchrun in its place).

For each optimizer step it records the documents this rank ran and the gradient of every trainable parameter
after the backward and before the step (so before clipping), as DeepSpeed's safe_get_full_grad reads it from
ZeRO's partitions or where the fast path left it; with --lora, the LoRA factors before the first step and the
gradients under PEFT's names. Written to OUTPUT_DIR/probe-rank{rank}.pt when the run ends."""
import os
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from qwen_moe_ft.config import load_config
from qwen_moe_ft.model.lora import adapter_state_dict
from qwen_moe_ft.train import Trainer


def _documents(micro_batches) -> list[dict]:
    """Each real document of the micro-batches as its token ids and next-token targets, packed or padded."""
    docs = []
    for micro in micro_batches:
        ids, targets = micro.inputs["input_ids"], micro.shift_labels
        if "attention_mask" in micro.inputs:  # padded: one document a row, right-padded
            rows = [(ids[i, :n], targets[i, :n]) for i, n in enumerate(micro.doc_lengths) if n]
        else:  # packed: the documents side by side in one row
            bounds = torch.tensor([0, *micro.doc_lengths]).cumsum(0).tolist()
            rows = [(ids[0, a:b], targets[0, a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
        docs += [{"input_ids": x.clone(), "shift_labels": y.clone()} for x, y in rows]
    return docs


def _grads(trainer, lora: bool) -> dict[str, torch.Tensor]:
    params = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    grads = {id(p): safe_get_full_grad(p).detach().float().clone() for p in params}  # collective: every rank
    if not lora:
        return {name: grads[id(p)] for name, p in trainer.engine.module.named_parameters() if p.requires_grad}
    values = [p.data for p in params]
    try:  # the gradients laid out as the adapter lays out the factors (its expert gather is collective too)
        for p in params:
            p.data = grads[id(p)].to(p.dtype)
        return adapter_state_dict(trainer.engine.module)
    finally:
        for p, value in zip(params, values):
            p.data = value


def run_probed(trainer, record: dict, before_micro_batches, out_name: str) -> None:
    """Run `trainer` to its end, calling before_micro_batches(micro_batches) ahead of each step's micro-batches and
    appending every trainable gradient to record["grads"] before each optimizer step; then save `record` to
    OUTPUT_DIR/out_name."""
    run_step, engine_step = trainer.run_step, trainer.engine.step

    def probed_run_step(micro_batches, *args, **kwargs):
        before_micro_batches(micro_batches)
        return run_step(micro_batches, *args, **kwargs)

    def probed_engine_step(*args, **kwargs):
        record["grads"].append(_grads(trainer, trainer.cfg.lora.enabled))
        return engine_step(*args, **kwargs)

    trainer.run_step, trainer.engine.step = probed_run_step, probed_engine_step
    trainer.run()
    torch.save(record, os.path.join(trainer.cfg.output.dir, out_name))


def main(argv: list[str]) -> None:
    trainer = Trainer(load_config(argv))
    record = {"documents": [], "grads": []}
    if trainer.cfg.lora.enabled:
        record["initial_adapter"] = adapter_state_dict(trainer.engine.module)
    run_probed(trainer, record, lambda micro_batches: record["documents"].append(_documents(micro_batches)),
               f"probe-rank{trainer.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
