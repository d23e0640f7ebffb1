"""The shipped default: data/tiny-qwen3-moe loads like a hub Qwen3-MoE checkpoint, and the sample data is valid."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import REPO

DATA = REPO / "data"
TINY = DATA / "tiny-qwen3-moe"
SAMPLES = {"sample_sft.jsonl": 3000, "sample_eval.jsonl": 200}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "Reverse abc"},
        {"role": "assistant", "content": "cba"}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def samples():
    out = {}
    for name in SAMPLES:
        with open(DATA / name) as f:
            out[name] = [json.loads(line) for line in f]
    return out


def test_config_is_a_small_qwen3_moe(model, tokenizer):
    config = model.config
    assert config.model_type == "qwen3_moe" and type(model).__name__ == "Qwen3MoeForCausalLM"
    assert config.num_experts == 8 and config.num_experts_per_tok == 2 and config.norm_topk_prob
    assert config.decoder_sparse_step == 1 and config.mlp_only_layers == []
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.moe_intermediate_size) == (64, 2, 4, 2, 16, 64)
    assert config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert not config.tie_word_embeddings
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_is_qwen_style(tokenizer):
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert 1024 <= len(tokenizer) <= 4096
    ids = tokenizer("<|im_start|>user\nAdd 123 and 45.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == "<|im_start|>user\nAdd 123 and 45.<|im_end|>"
    assert "1" in tokenizer.tokenize("123")  # Qwen's pre-tokenizer splits numbers into digits


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 3<|im_end|>\n"
                    "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nReverse abc<|im_end|>\n"
                    "<|im_start|>assistant\ncba<|im_end|>\n<|im_start|>assistant\n")
    assert not tokenizer.apply_chat_template(CHAT, tokenize=False).endswith("<|im_start|>assistant\n")


def assistant_tokens(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    return ids, [i for i, m in zip(ids, mask) if m]


def test_assistant_mask_covers_exactly_the_answers(tokenizer):
    ids, masked = assistant_tokens(tokenizer, CHAT)
    assert tokenizer.decode(masked) == "5<|im_end|>cba<|im_end|>"
    assert ids[:len(tokenizer.apply_chat_template(CHAT[:2], tokenize=True, return_dict=True)["input_ids"])] == \
        tokenizer.apply_chat_template(CHAT[:2], tokenize=True, return_dict=True)["input_ids"]


def test_assistant_mask_on_every_sample_row(tokenizer, samples):
    end = tokenizer.eos_token_id
    for name, rows in samples.items():
        for n, row in enumerate(rows):
            ids, masked = assistant_tokens(tokenizer, row["messages"])
            expected = []
            for m in row["messages"]:
                if m["role"] == "assistant":
                    expected += tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [end]
            assert masked == expected, (name, n)
            assert 20 <= len(ids) <= 120, (name, n, len(ids))


def test_forward_loss_is_near_uniform(model, tokenizer):
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert math.isfinite(out.loss.item())
    assert abs(out.loss.item() - math.log(len(tokenizer))) < 0.5


def test_directory_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in TINY.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    assert sum(files.values()) < 5 * 2**20


def test_sample_rows_are_valid_dialogues(samples):
    keys = {}
    for name, rows in samples.items():
        assert len(rows) == SAMPLES[name]
        for n, row in enumerate(rows):
            assert set(row) == {"messages"}, (name, n)
            messages = row["messages"]
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"]
                       for m in messages), (name, n)
            roles = [m["role"] for m in messages]
            assert set(roles) <= {"system", "user", "assistant"}, (name, n)
            if roles[0] == "system":
                roles = roles[1:]
            assert roles and len(roles) % 2 == 0 and roles == ["user", "assistant"] * (len(roles) // 2), (name, n)
            keys.setdefault(name, set()).add(json.dumps(row, sort_keys=True))
    assert not keys["sample_sft.jsonl"] & keys["sample_eval.jsonl"], "eval rows must not appear in training"
    train = samples["sample_sft.jsonl"]
    assert any(m["role"] == "system" for r in train for m in r["messages"][:1])
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in train)
