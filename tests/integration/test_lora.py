"""LoRA under AutoEP: EP=2 trains what EP=1 trains, the exported PEFT adapter on the stock model
reproduces the trained engine, and a run stopped by SIGTERM resumes exactly, at its own layout and at another."""
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import (EVAL, SAMPLE, TINY, eval_loss, max_rel_err, read_metrics, train, train_together,
                     train_until_sigterm)
from qwen_moe_ft.checkpoint import COMPLETE
from qwen_moe_ft.config import ConfigError, TrainConfig

RUN = ["--lora", "true", "--data", str(SAMPLE), "--eval-data", str(EVAL), "--max-steps", "6", "--lr", "5e-3",
       "--max-tokens-per-batch", "1024", "--max-seq-len", "512", "--seed", "3",
       "--adam-states", "fp32"]  # bf16 moments round with random bits drawn per partition offset, which EP changes


# Activation checkpointing recomputes a layer with the same ops: EP=2 with it on the first of the tiny model's two
# layers still matches EP=1 without it.
EP2 = [*RUN, "--ep-size", "2", "--merge", "true", "--activation-checkpointing", "true", "--checkpoint-layers", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {1: tmp_path_factory.mktemp("lora_ep1"), 2: tmp_path_factory.mktemp("lora_ep2")}
    train_together([(out[1], [*RUN, "--ep-size", "1"]), (out[2], EP2)], nproc=2)  # side by side
    return out


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory):
    """The EP=2 run of `runs`, stopped by SIGTERM after a few of its 6 steps, then resumed from its checkpoint."""
    out = tmp_path_factory.mktemp("lora_ep2_resumed")
    first_output = train_until_sigterm(out, *EP2, after_steps=2)
    stopped_at = len(read_metrics(out))
    second = train(out, *EP2, "--resume", "latest")
    return out, first_output, stopped_at, second.stdout


def test_ep2_lora_matches_ep1(runs):
    ep1, ep2 = (read_metrics(runs[ep]) for ep in (1, 2))
    for a, b in zip(ep1, ep2):
        assert a.get("loss", a.get("eval_loss")) == pytest.approx(b.get("loss", b.get("eval_loss")), rel=1e-5)
    w1, w2 = (load_file(runs[ep] / "adapter" / "adapter_model.safetensors") for ep in (1, 2))
    assert sorted(w1) == sorted(w2)
    for name in w1:
        # float32 in another reduction order: ~1e-7 relative a step for a typical element, but an element whose
        # gradient nearly cancels takes an Adam step of ~lr either way, so single elements may differ by a few
        # 1e-3 of the largest (1.4e-3 seen on an AVX2 machine): the mean bounds the whole, the max the outliers.
        # A missing rank's gradients would move both to ~1.
        diff = (w1[name] - w2[name]).abs()
        assert diff.mean() <= 1e-4 * w1[name].abs().mean(), name
        assert diff.max() <= 1e-2 * w1[name].abs().max(), name


def test_adapter_on_the_stock_model_gives_the_engine_eval_loss(runs):
    engine_eval = [m for m in read_metrics(runs[2]) if "eval_loss" in m][-1]
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    base_loss, _ = eval_loss(base, tokenizer)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
                                      runs[2] / "adapter")
    loss, tokens = eval_loss(tuned, tokenizer)
    assert tokens == engine_eval["eval_label_tokens"]
    assert loss == pytest.approx(engine_eval["eval_loss"], rel=1e-5)
    assert loss < base_loss - 0.01, "the adapter changes nothing"
    keys = load_file(runs[2] / "adapter" / "adapter_model.safetensors")
    assert any("mlp.experts.base_layer.lora_B" in k for k in keys) and any("q_proj.lora_A" in k for k in keys)


def test_lora_needs_expert_targets_and_takes_checkpoint_options():
    with pytest.raises(ConfigError, match="--lora-targets"):
        TrainConfig.from_flat(lora=True, lora_targets="attn").validate()
    with pytest.raises(ConfigError, match="--merge"):
        TrainConfig.from_flat(merge=True).validate()
    TrainConfig.from_flat(lora=True, save_steps=10, resume="latest").validate()


def test_sigterm_saves_a_lora_checkpoint_and_the_resumed_run_continues_exactly(runs, interrupted_and_resumed):
    resumed, first_output, stopped_at, second_output = interrupted_and_resumed
    assert 2 <= stopped_at < 6, "SIGTERM came after the last step: nothing was resumed"
    assert f"stopped by SIGTERM after step {stopped_at}; continue with --resume latest" in first_output
    checkpoint = resumed / "checkpoints" / f"step-{stopped_at}"
    assert (checkpoint / COMPLETE).exists() and (checkpoint / "lora_slices_rank1.pt").exists()
    assert f"resumed from {checkpoint} at step {stopped_at}" in second_output
    assert "| 1 of 2 layers recomputed |" in second_output
    straight, again = read_metrics(runs[2]), read_metrics(resumed)
    assert [m.get("step") for m in again] == [m.get("step") for m in straight]
    # the same arithmetic in the same order: only a lost or stale state would move a loss
    for a, b in zip(straight, again):
        assert a.get("loss", a.get("eval_loss")) == pytest.approx(b.get("loss", b.get("eval_loss")), rel=1e-6)
    w1, w2 = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (runs[2], resumed))
    assert sorted(w1) == sorted(w2)
    for name in w1:
        assert max_rel_err(w2[name], w1[name]) < 1e-6, name


def test_a_lora_checkpoint_resumes_at_another_layout(runs, interrupted_and_resumed, tmp_path):
    """The EP=2 checkpoint of two processes resumed by one process at EP=1 accumulating two micro-batches (the same
    two a step) trains what the EP=1 run of two processes trains: its layout-free slices hold every factor's fp32
    master and moments whole, the experts' gathered from both EP ranks. The tolerance is test_ep2_lora_matches_ep1's
    (another reduction order); lost moments would move every factor by O(lr)."""
    resumed, _, stopped_at, _ = interrupted_and_resumed
    checkpoint = resumed / "checkpoints" / f"step-{stopped_at}"
    proc = train(tmp_path, *RUN, "--ep-size", "1", "--grad-accum", "2", "--resume", str(checkpoint), nproc=1)
    assert (f"step-{stopped_at} was saved by 2 process(es) at EP=2 (LoRA): resumed through its LoRA slices"
            in proc.stdout)
    straight, again = read_metrics(runs[1]), read_metrics(tmp_path)
    assert [m.get("step") for m in again] == [m.get("step") for m in straight if m.get("step", 0) > stopped_at]
    for a, b in zip([m for m in straight if m.get("step", 0) > stopped_at], again):
        assert a.get("loss", a.get("eval_loss")) == pytest.approx(b.get("loss", b.get("eval_loss")), rel=1e-5)
    w1, w2 = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (runs[1], tmp_path))
    assert sorted(w1) == sorted(w2)
    for name in w1:
        diff = (w1[name] - w2[name]).abs()
        assert diff.mean() <= 1e-4 * w1[name].abs().mean(), name
        assert diff.max() <= 1e-2 * w1[name].abs().max(), name


def test_merged_checkpoint_loads_as_a_plain_model_with_the_engine_eval_loss(runs):
    engine_eval = [m for m in read_metrics(runs[2]) if "eval_loss" in m][-1]
    assert not (runs[1] / "hf").exists(), "a LoRA run writes hf/ only with --merge"
    merged = AutoModelForCausalLM.from_pretrained(runs[2] / "hf", dtype=torch.float32)
    loss, _ = eval_loss(merged, AutoTokenizer.from_pretrained(runs[2] / "hf"))
    assert loss == pytest.approx(engine_eval["eval_loss"], rel=1e-5)
