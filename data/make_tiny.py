"""Generate the embedded default: sample SFT data and a tiny, genuine Qwen3-MoE checkpoint.

    python data/make_tiny.py

Writes data/sample_sft.jsonl (3000 dialogues), data/sample_eval.jsonl (200 others) and
data/tiny-qwen3-moe/: config.json, generation_config.json, model.safetensors (float32) and a
Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer, vocab 2048 trained here on the sample data)
with a ChatML chat template as Qwen3 uses. Everything loads with AutoTokenizer and
AutoModelForCausalLM like Qwen/Qwen3-30B-A3B does. Deterministic: the same files come out every time.
"""
from __future__ import annotations

import json
import random
import shutil
import statistics
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import Qwen2Tokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny-qwen3-moe"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
VOCAB_SIZE = 2048
TRAIN_ROWS, EVAL_ROWS = 3000, 200
MIN_TOKENS, MAX_TOKENS = 20, 120  # rendered length of a row, template included
# Qwen3's ChatML framing without its thinking-mode extras. The {% generation %} block marks what
# the model learns (each answer and its <|im_end|>) for return_assistant_tokens_mask=True.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer with the result only.", "You are precise and brief.",
                  "You are a careful assistant. Give only the final answer, nothing else."]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, low: int = 3, high: int = 12) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _words(rng: random.Random, low: int, high: int, wlow: int = 2, whigh: int = 7) -> list[str]:
    return [_word(rng, wlow, whigh) for _ in range(rng.randint(low, high))]


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["reverse", "add", "multiply", "upper", "sort", "count", "repeat", "reverse_words",
                       "sort_numbers", "spell"])
    if kind == "reverse":
        w = _word(rng, 3, 14)
        return rng.choice([f"Reverse the string: {w}", f"Reverse: {w}"]), w[::-1]
    if kind == "add":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}."]), str(a + b)
    if kind == "multiply":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"Multiply {a} by {b}.", str(a * b)
    if kind == "upper":
        words = " ".join(_words(rng, 1, 6))
        return f"Uppercase this: {words}", words.upper()
    if kind == "sort":
        w = _word(rng, 4, 14)
        return f"Sort the letters of {w} alphabetically.", "".join(sorted(w))
    if kind == "count":
        w = _word(rng, 3, 20)
        return f"How many letters are in {w}?", str(len(w))
    if kind == "reverse_words":
        words = _words(rng, 2, 7)
        return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))
    if kind == "sort_numbers":
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
        return (f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}",
                ", ".join(map(str, sorted(numbers))))
    if kind == "spell":
        w = _word(rng, 3, 10)
        return f"Spell {w} with dashes between the letters.", "-".join(w)
    words = _words(rng, 2, 5)
    n = rng.randint(2, 3)
    return f"Repeat {n} times: {' '.join(words)}", " | ".join([" ".join(words)] * n)


def _dialogue(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = rng.choices([1, 2, 3], weights=[70, 25, 5])[0]
    for _ in range(turns):
        question, answer = _task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def candidate_rows(count: int) -> list[dict]:
    """`count` distinct dialogues, in a fixed order."""
    rng = random.Random(1234)
    rows, seen = [], set()
    while len(rows) < count:
        row = _dialogue(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def build_tokenizer(rows: list[dict]) -> Qwen2Tokenizer:
    """Byte-level BPE with Qwen2/3's normalizer and pre-tokenizer (digits split one by one), wrapped
    in the Qwen2Tokenizer class that Qwen3 checkpoints name."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # The text between the special tokens, as the chat template lays it out.
    backend.train_from_iterator((m["role"] + "\n" + m["content"] + "\n" for r in rows for m in r["messages"]),
                                trainer)
    model = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        add_prefix_space=False, clean_up_tokenization_spaces=False, model_max_length=2048,
        chat_template=CHAT_TEMPLATE)
    probe = "<|im_start|>user\nWhat is 464 plus 897?  Reverse: abc\n\n<|im_end|>\n"
    assert tokenizer(probe)["input_ids"] == backend.encode(probe).ids, "Qwen2Tokenizer rebuilt a different BPE"
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2]
    return tokenizer


def row_length(tokenizer, row: dict) -> int:
    return len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])


def build_model(tokenizer) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6, tie_word_embeddings=False, output_router_logits=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config)


def main() -> None:
    pool = candidate_rows(4400)
    tokenizer = build_tokenizer(pool)
    rows, lengths = [], []
    for row in pool:
        n = row_length(tokenizer, row)
        if MIN_TOKENS <= n <= MAX_TOKENS:
            rows.append(row)
            lengths.append(n)
        if len(rows) == TRAIN_ROWS + EVAL_ROWS:
            break
    assert len(rows) == TRAIN_ROWS + EVAL_ROWS, f"only {len(rows)} candidate rows fit {MIN_TOKENS}-{MAX_TOKENS} tokens"
    for name, part in (("sample_sft.jsonl", rows[:TRAIN_ROWS]), ("sample_eval.jsonl", rows[TRAIN_ROWS:])):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in part))

    model = build_model(tokenizer)
    shutil.rmtree(OUT, ignore_errors=True)
    tokenizer.save_pretrained(OUT)
    model.save_pretrained(OUT, safe_serialization=True)

    size = sum(f.stat().st_size for f in OUT.iterdir())
    params = sum(p.numel() for p in model.parameters())
    multi = sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows)
    print(f"sample_sft.jsonl {TRAIN_ROWS} rows, sample_eval.jsonl {EVAL_ROWS} rows ({multi} multi-turn in all); "
          f"tokens per row {min(lengths)}-{max(lengths)}, median {statistics.median(lengths):.0f}, "
          f"{sum(lengths[:TRAIN_ROWS]):,} in the training set")
    print(f"{OUT.relative_to(HERE.parent)}: vocab {len(tokenizer)}, {params:,} parameters, {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
