"""Generate the embedded default: sample SFT data and a tiny, genuine Qwen3-MoE checkpoint.

    python data/make_tiny.py

Writes data/sample_sft.jsonl, data/sample_eval.jsonl and data/tiny-qwen3-moe/ (config.json,
model.safetensors, tokenizer files with a ChatML template as Qwen3 uses). Deterministic: the
same files come out every time.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

HERE = Path(__file__).resolve().parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's ChatML framing without its thinking-mode extras.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer with the result only.", "You are precise and brief."]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, low: int = 3, high: int = 12) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["reverse", "add", "upper", "sort", "count", "repeat", "multiply"])
    if kind == "reverse":
        w = _word(rng)
        return f"Reverse the string: {w}", w[::-1]
    if kind == "add":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == "multiply":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"Multiply {a} by {b}.", str(a * b)
    if kind == "upper":
        words = " ".join(_word(rng, 2, 8) for _ in range(rng.randint(1, 5)))
        return f"Uppercase this: {words}", words.upper()
    if kind == "sort":
        w = _word(rng, 4, 14)
        return f"Sort the letters of {w} alphabetically.", "".join(sorted(w))
    if kind == "count":
        w = _word(rng, 3, 20)
        return f"How many letters are in {w}?", str(len(w))
    words = [_word(rng, 2, 7) for _ in range(rng.randint(2, 6))]
    n = rng.randint(2, 3)
    return f"Repeat {n} times: {' '.join(words)}", " | ".join([" ".join(words)] * n)


def _dialogue(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(1 if rng.random() < 0.75 else rng.randint(2, 3)):
        question, answer = _task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_data(train_rows: int = 3000, eval_rows: int = 200) -> list[dict]:
    rng = random.Random(1234)
    rows, seen = [], set()
    while len(rows) < train_rows + eval_rows:
        row = _dialogue(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    for name, part in (("sample_sft.jsonl", rows[:train_rows]), ("sample_eval.jsonl", rows[train_rows:])):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return rows


def build_tokenizer(rows: list[dict], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["role"] + "\n" + m["content"] for r in rows for m in r["messages"]]
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        output_router_logits=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config)


def main() -> None:
    rows = write_data()
    tokenizer = build_tokenizer(rows, vocab_size=2048)
    model = build_model(tokenizer)
    out = HERE / "tiny-qwen3-moe"
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    size = sum(f.stat().st_size for f in out.iterdir())
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(rows)} dialogues; vocab {len(tokenizer)}; {params:,} parameters; {out} is {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
