"""SFT data: load rows, render and tokenise them once (cached), mask labels, account for bad rows.

Every example becomes `input_ids` and `labels` of equal length; `labels` holds the token itself
where the model is trained to predict it and -100 elsewhere (unshifted; the collator shifts per
document so that no label crosses into the next document of a packed row).
"""
from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from ..config import DataConfig
from ..local_paths import looks_local

IGNORE = -100
ROLES = ("system", "user", "assistant")
# ChatML, as Qwen's templates write it: the answer and its <|im_end|> are what the model learns.
ASSISTANT_SPAN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)
LOCAL_FORMATS = {".jsonl": "text", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
REPORT_LIMIT = 5
# Reasons a row is dropped and counted whatever --on-bad-row says: the data is fine, --max-seq-len is the choice.
DROPPED_NOT_BAD = ("too_long",)
# JSONL bytes that are not UTF-8 become NUL, which no valid JSON line holds raw (JSON escapes control characters),
# so a row that is valid UTF-8 and contains U+FFFD stays a good row.
NOT_UTF8 = "\x00"
codecs.register_error("qwen_moe_ft.not_utf8", lambda err: (NOT_UTF8, err.end))


class DataError(ValueError):
    """Bad input data: the message names the file, the row and what is wrong."""


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class EncodeOptions(NamedTuple):
    """The options tokenisation depends on (and its cache key), nothing more."""
    max_seq_len: int
    train_on_prompt: bool
    truncation: str

    @classmethod
    def of(cls, cfg: DataConfig) -> "EncodeOptions":
        return cls(cfg.max_seq_len, cfg.train_on_prompt, cfg.truncation)


# A share of rows left out past which the log's line on them is a warning: a --max-seq-len below most of the data
WARN_SHARE = 0.1


@dataclass
class TokenizedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    skipped: Counter
    truncated: int

    def report(self, max_seq_len: int, truncation: str) -> str:
        """The log's line on the rows left out or cut, with their share of all rows read; empty when none were."""
        if not self.skipped and not self.truncated:
            return ""
        left_out = sum(self.skipped.values())
        rows = len(self.train) + (len(self.eval) if self.eval is not None else 0) + left_out
        parts = []
        if long := self.skipped.get("too_long", 0):
            parts.append(f"{long} of {rows} rows ({long / rows:.0%}) longer than --max-seq-len {max_seq_len} dropped"
                         + (" (raise it)" if truncation == "truncate" else " (raise it, or --truncation truncate)"))
        if bad := {reason: n for reason, n in self.skipped.items() if reason != "too_long"}:
            parts.append(f"bad rows skipped by reason: {bad}")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to fit")
        return ("warning: " if left_out >= WARN_SHARE * rows else "") + "; ".join(parts)


def _load_raw(source: str) -> tuple[datasets.Dataset, str]:
    """Rows of `source`, and how they are stored: 'line' (raw JSONL text) or 'record' (parsed)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path)), "record"
        raise DataError(f"{path}: a directory, but not one saved by datasets.save_to_disk; "
                        f"point --data at a {'/'.join(LOCAL_FORMATS)} file or such a directory")
    if path.is_file() and suffix not in LOCAL_FORMATS:
        raise DataError(f"{path}: a {suffix or 'suffix-less'} file; --data reads {', '.join(LOCAL_FORMATS)} files")
    if suffix in LOCAL_FORMATS or looks_local(source):
        if not path.is_file():
            raise DataError(f"{path}: no such file or directory; --data takes a {'/'.join(LOCAL_FORMATS)} file, a "
                            "directory saved by datasets, or a hub dataset name like org/name")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        loader = LOCAL_FORMATS[suffix]
        if loader == "text":
            # Lines are read as text and parsed per row, so that one broken line is reported with its number
            # instead of failing the whole load; utf-8-sig drops a byte-order mark.
            raw = datasets.load_dataset("text", data_files=str(path), split="train", encoding="utf-8-sig",
                                        encoding_errors="qwen_moe_ft.not_utf8")
            return raw, "line"
        try:
            raw = datasets.load_dataset(loader, data_files=str(path), split="train")
            if loader == "csv":  # cells are text, as JSON strings are: a response 3 is the string "3"
                raw = raw.cast(datasets.Features({name: datasets.Value("string") for name in raw.column_names}))
            return raw, "record"
        except Exception as err:  # datasets wraps the parser's error in its own types
            raise DataError(f"{path}: could not be read as {loader} ({_where_invalid(path, loader, err)})") from None
    try:
        return datasets.load_dataset(source, split="train"), "record"
    except Exception as err:  # the hub client raises many types; all mean "could not fetch"
        raise DataError(f"{source}: could not load this hub dataset ({type(err).__name__}: {err}). "
                        "Offline? Download it elsewhere and point --data at a local file.") from err


def _where_invalid(path: Path, loader: str, err: Exception) -> str:
    """Where a .json file stops being JSON (line and column), else what datasets said."""
    if loader == "json":
        try:
            json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as bad:
            return f"not valid JSON: {bad.msg} at line {bad.lineno}, column {bad.colno}"
        except UnicodeDecodeError:
            return "not valid UTF-8"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _parse_line(line: str) -> dict[str, Any] | None:
    if NOT_UTF8 in line:
        raise BadRow("not_utf8", "the line is not valid UTF-8")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRow("bad_json", f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadRow("bad_json", "a JSON object was expected")
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("not_utf8", "holds a lone surrogate escape (\\ud800-\\udfff), which no UTF-8 text can") from None
    return record


def _messages_of(record: dict[str, Any]) -> list[dict[str, str]] | None:
    """The conversation of a chat or prompt/response row; None for a plain-text row."""
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRow("empty_conversation", "'messages' is empty or not a list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise BadRow("missing_field", f"message {i} needs 'role' and 'content'")
            if message["role"] not in ROLES:
                raise BadRow("wrong_role", f"message {i} has role {message['role']!r}; use one of {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise BadRow("missing_field", f"message {i} has non-string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("empty_conversation", "the conversation has no assistant turn to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if record.get("prompt") is not None or record.get("response") is not None:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise BadRow("missing_field", "a prompt/response row needs both as strings")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    if isinstance(record.get("text"), str):
        return None
    raise BadRow("missing_field", "found none of 'messages', 'prompt'/'response' or 'text'")


def _encode_chat(messages, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        return ids, list(ids)
    spans = [m.span(1) for m in ASSISTANT_SPAN.finditer(text)]
    if not spans:
        raise DataError("the tokenizer's chat template does not write assistant turns as "
                        "'<|im_start|>assistant\\n...<|im_end|>' (ChatML, as Qwen does); "
                        "use --train-on-prompt or a Qwen tokenizer")
    labels = [IGNORE] * len(ids)
    span = 0
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and start >= spans[span][0] and end > start:
            labels[i] = ids[i]
    return ids, labels


def _fit_chat(messages, tokenizer, cfg: EncodeOptions) -> tuple[list[int], list[int], bool]:
    """Encode, dropping whole trailing turns under --truncation truncate; never cuts inside an answer."""
    ids, labels = _encode_chat(messages, tokenizer, cfg.train_on_prompt)
    if len(ids) <= cfg.max_seq_len:
        return ids, labels, False
    if cfg.truncation == "truncate":
        ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
        for end in reversed(ends[:-1]):
            ids, labels = _encode_chat(messages[:end], tokenizer, cfg.train_on_prompt)
            if len(ids) <= cfg.max_seq_len:
                return ids, labels, True
    raise BadRow("too_long", f"{len(ids)} tokens exceed --max-seq-len {cfg.max_seq_len}"
                 + ("" if cfg.truncation == "truncate" else "; --truncation truncate drops trailing turns to fit"))


def encode_record(record: dict[str, Any], tokenizer, cfg: EncodeOptions) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one parsed row; raises BadRow."""
    messages = _messages_of(record)
    if messages is not None:
        return _fit_chat(messages, tokenizer, cfg)
    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) <= 1:
        raise BadRow("empty_text", "'text' is empty")
    truncated = len(ids) > cfg.max_seq_len
    if truncated and cfg.truncation != "truncate":
        raise BadRow("too_long", f"{len(ids)} tokens exceed --max-seq-len {cfg.max_seq_len}; "
                     "--truncation truncate cuts plain text to fit")
    ids = ids[:cfg.max_seq_len]
    return ids, list(ids), truncated


def _tokenize_batch(batch, indices, *, kind, tokenizer, cfg):
    out = {"input_ids": [], "labels": [], "row": [], "bad_reason": [], "bad_detail": [], "truncated": []}
    keys = list(batch.keys())
    for j, index in enumerate(indices):
        ids, labels, truncated, reason, detail = [], [], False, "", ""
        try:
            record = _parse_line(batch["text"][j]) if kind == "line" else {k: batch[k][j] for k in keys}
            if record is None:
                reason = "blank"
            else:
                ids, labels, truncated = encode_record(record, tokenizer, cfg)
                if not any(label != IGNORE for label in labels[1:]):
                    raise BadRow("no_labels", "no token to learn from after masking")
        except BadRow as bad:
            reason, detail = bad.reason, bad.detail
        for key, value in zip(out, (ids, labels, index + 1, reason, detail, truncated)):
            out[key].append(value)
    return out


def tokenize_source(source: str, tokenizer, cfg: DataConfig) -> tuple[datasets.Dataset, Counter, int]:
    """Tokenised good rows of `source`, skip counts by reason, and the number truncated."""
    raw, kind = _load_raw(source)
    tokenized = raw.map(_tokenize_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                        fn_kwargs={"kind": kind, "tokenizer": tokenizer, "cfg": EncodeOptions.of(cfg)},
                        num_proc=cfg.num_proc if cfg.num_proc > 1 else None, desc=f"tokenizing {source}")
    reasons = Counter(r for r in tokenized["bad_reason"] if r and r != "blank")
    if cfg.on_bad_row == "error" and set(reasons) - set(DROPPED_NOT_BAD):
        bad = tokenized.filter(lambda r: r["bad_reason"] not in ("", "blank", *DROPPED_NOT_BAD))
        reasons = Counter({k: v for k, v in reasons.items() if k not in DROPPED_NOT_BAD})
        lines = [f"  row {r}: {reason}: {detail}" for r, reason, detail in
                 zip(bad["row"][:REPORT_LIMIT], bad["bad_reason"][:REPORT_LIMIT], bad["bad_detail"][:REPORT_LIMIT])]
        raise DataError(f"{source}: {sum(reasons.values())} bad row(s) ({dict(reasons)}), first:\n"
                        + "\n".join(lines) + "\nFix them, or pass --on-bad-row skip to skip and count them.")
    truncated = sum(tokenized["truncated"])
    good = tokenized.filter(lambda r: r["bad_reason"] == "", desc="dropping bad rows")
    return good.select_columns(["input_ids", "labels"]), reasons, truncated


def load_tokenized(cfg: DataConfig, tokenizer, seed: int) -> TokenizedData:
    """--data tokenised, and the held-out set (--eval-data, or --eval-split of --data split by `seed`)."""
    train, skipped, truncated = tokenize_source(cfg.source, tokenizer, cfg)
    eval_set = None
    if cfg.eval_data:
        eval_set, eval_skipped, eval_truncated = tokenize_source(cfg.eval_data, tokenizer, cfg)
        skipped += eval_skipped
        truncated += eval_truncated
    elif cfg.eval_split:
        split = train.train_test_split(test_size=cfg.eval_split, seed=seed)
        train, eval_set = split["train"], split["test"]
    if len(train) == 0:
        raise DataError(f"{cfg.source}: no usable rows left (skipped: {dict(skipped)})")
    return TokenizedData(train=train, eval=eval_set, skipped=skipped, truncated=truncated)
