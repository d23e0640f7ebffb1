"""hf/ export: the stock transformers model loaded from it computes what the trained engine computed."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import REPO, eval_loss, read_metrics


def test_exported_checkpoint_loads_and_reproduces_the_engine_eval_loss(exported_run):
    """The run of conftest.py: two processes at EP=2, 5 steps."""
    engine_eval = [m for m in read_metrics(exported_run) if "eval_loss" in m][-1]

    hf = exported_run / "hf"
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
