"""hf/ export: the stock transformers model loaded from it computes what the trained engine computed."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, SAMPLE, read_metrics, train
from qwen_moe_ft.config import TrainConfig
from qwen_moe_ft.data import IGNORE, tokenize_source
from qwen_moe_ft.packing import collate_padded

EVAL = REPO / "data" / "sample_eval.jsonl"


def test_exported_checkpoint_loads_and_reproduces_the_engine_eval_loss(tmp_path):
    train(tmp_path, "--data", str(SAMPLE), "--eval-data", str(EVAL), "--max-steps", "5", "--lr", "3e-3",
          "--max-tokens-per-batch", "1024", "--max-seq-len", "512", "--ep-size", "2")
    engine_eval = [m for m in read_metrics(tmp_path) if "eval_loss" in m][-1]

    hf = tmp_path / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 8
    data, _, _ = tokenize_source(str(EVAL), tokenizer, TrainConfig(max_seq_len=512))
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), 16):
            batch = collate_padded([data[j] for j in range(i, min(i + 16, len(data)))], tokenizer.pad_token_id)
            logits = model(**batch.inputs).logits
            loss_sum += F.cross_entropy(logits.flatten(0, 1), batch.shift_labels.flatten(), ignore_index=IGNORE,
                                        reduction="sum").item()
            tokens += batch.num_label_tokens
    assert tokens == engine_eval["eval_label_tokens"]
    assert loss_sum / tokens == pytest.approx(engine_eval["eval_loss"], rel=1e-5)

    base = AutoModelForCausalLM.from_pretrained(REPO / "data" / "tiny-qwen3-moe", dtype=torch.float32)
    name = "model.layers.1.mlp.experts.down_proj"
    trained = dict(model.named_parameters())
    assert not torch.allclose(trained[name], dict(base.named_parameters())[name]), "experts did not change"
