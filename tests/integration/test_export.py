"""hf/ export: the stock transformers model loaded from it computes what the trained engine computed."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import EVAL, REPO, SAMPLE, eval_loss, read_metrics, train


def test_exported_checkpoint_loads_and_reproduces_the_engine_eval_loss(tmp_path):
    train(tmp_path, "--data", str(SAMPLE), "--eval-data", str(EVAL), "--max-steps", "5", "--lr", "3e-3",
          "--max-tokens-per-batch", "1024", "--max-seq-len", "512", "--ep-size", "2")
    engine_eval = [m for m in read_metrics(tmp_path) if "eval_loss" in m][-1]

    hf = tmp_path / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 8
    loss, tokens = eval_loss(model, tokenizer)
    assert tokens == engine_eval["eval_label_tokens"]
    assert loss == pytest.approx(engine_eval["eval_loss"], rel=1e-5)

    base = AutoModelForCausalLM.from_pretrained(REPO / "data" / "tiny-qwen3-moe", dtype=torch.float32)
    name = "model.layers.1.mlp.experts.down_proj"
    trained = dict(model.named_parameters())
    assert not torch.allclose(trained[name], dict(base.named_parameters())[name]), "experts did not change"
