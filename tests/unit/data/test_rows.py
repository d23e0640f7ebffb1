import json

import datasets
import pytest

from qwen_moe_ft.config import DataConfig
from qwen_moe_ft.data.rows import IGNORE, DataError, load_tokenized, tokenize_source


def write_jsonl(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return str(path)


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3"},
                     {"role": "assistant", "content": "5"}, {"role": "user", "content": "Reverse abc"},
                     {"role": "assistant", "content": "cba"}]}


def labelled_text(tokenizer, example):
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE])


def test_chat_labels_only_the_assistant_answers(tmp_path, tiny_tokenizer):
    data, _, _ = tokenize_source(write_jsonl(tmp_path / "d.jsonl", [CHAT]), tiny_tokenizer, DataConfig())
    example = data[0]
    assert labelled_text(tiny_tokenizer, example) == "5<|im_end|>cba<|im_end|>"
    assert tiny_tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_train_on_prompt_labels_everything(tmp_path, tiny_tokenizer):
    cfg = DataConfig(train_on_prompt=True)
    data, _, _ = tokenize_source(write_jsonl(tmp_path / "d.jsonl", [CHAT]), tiny_tokenizer, cfg)
    assert data[0]["labels"] == data[0]["input_ids"]


def test_prompt_response_and_text_formats(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Add 1 and 1", "response": "2"}, {"text": "plain text for pre-training"}]
    data, skipped, _ = tokenize_source(write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, DataConfig())
    assert not skipped and len(data) == 2
    assert labelled_text(tiny_tokenizer, data[0]) == "2<|im_end|>"
    assert labelled_text(tiny_tokenizer, data[1]) == "plain text for pre-training<|im_end|>"


BAD_ROWS = [
    ({"messages": []}, "empty_conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "empty_conversation"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "wrong_role"),
    ({"conversation": "hi"}, "missing_field"),
    ({"prompt": "only a prompt"}, "missing_field"),
    (b'{"text": "caf\xe9"}', "not_utf8"),
    (b'{"text": "unterminated', "bad_json"),
    (b'{"text": "half a pair \\ud800 of surrogates"}', "not_utf8"),
]
TOO_LONG = {"text": "word " * 600}


@pytest.mark.parametrize("row, reason", BAD_ROWS)
def test_each_bad_row_is_named_with_file_and_row(tmp_path, tiny_tokenizer, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, row])
    with pytest.raises(DataError) as err:
        tokenize_source(path, tiny_tokenizer, DataConfig(max_seq_len=512))
    assert path in str(err.value) and "row 2" in str(err.value) and reason in str(err.value)
    assert "--on-bad-row skip" in str(err.value)


def test_skip_counts_every_bad_row_by_reason(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] + [row for row, _ in BAD_ROWS] + [TOO_LONG, CHAT])
    data, skipped, _ = tokenize_source(path, tiny_tokenizer, DataConfig(max_seq_len=512, on_bad_row="skip"))
    assert len(data) == 2
    expected = {"too_long": 1}
    for _, reason in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(skipped) == expected


def test_over_long_rows_are_dropped_and_counted_not_an_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, TOO_LONG, CHAT])
    data, skipped, _ = tokenize_source(path, tiny_tokenizer, DataConfig(max_seq_len=512, on_bad_row="error"))
    assert len(data) == 2 and dict(skipped) == {"too_long": 1}
    with pytest.raises(DataError, match=r"1 bad row\(s\) \({'bad_json': 1}\)"):  # malformed rows still stop it
        tokenize_source(write_jsonl(tmp_path / "e.jsonl", [CHAT, TOO_LONG, b"{"]), tiny_tokenizer,
                        DataConfig(max_seq_len=512))


def test_the_log_gives_the_share_of_rows_dropped_and_warns_when_it_is_large(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 9 + [TOO_LONG])
    data = load_tokenized(DataConfig(source=path, max_seq_len=512), tiny_tokenizer, seed=0)
    assert data.report(512, "drop") == ("warning: 1 of 10 rows (10%) longer than --max-seq-len 512 dropped (raise it, "
                                        "or --truncation truncate)")
    path = write_jsonl(tmp_path / "e.jsonl", [CHAT] * 10 + [TOO_LONG, b"{"])
    data = load_tokenized(DataConfig(source=path, max_seq_len=512, on_bad_row="skip"), tiny_tokenizer, seed=0)
    assert data.report(512, "truncate") == ("warning: 1 of 12 rows (8%) longer than --max-seq-len 512 dropped "
                                            "(raise it); bad rows skipped by reason: {'bad_json': 1}")
    data = load_tokenized(DataConfig(source=write_jsonl(tmp_path / "f.jsonl", [CHAT] * 10 + [TOO_LONG]),
                                     max_seq_len=512), tiny_tokenizer, seed=0)
    assert data.report(512, "drop").startswith("1 of 11 rows (9%) longer")  # under a tenth: no warning
    assert load_tokenized(DataConfig(source=write_jsonl(tmp_path / "g.jsonl", [CHAT])), tiny_tokenizer,
                          seed=0).report(4096, "drop") == ""


def test_truncate_drops_whole_turns_never_part_of_an_answer(tmp_path, tiny_tokenizer):
    long_second_turn = {"messages": CHAT["messages"][:3] + [{"role": "user", "content": "abc " * 300},
                                                            {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [long_second_turn])
    data, skipped, _ = tokenize_source(path, tiny_tokenizer, DataConfig(max_seq_len=64))
    assert len(data) == 0 and dict(skipped) == {"too_long": 1}
    data, skipped, truncated = tokenize_source(path, tiny_tokenizer, DataConfig(max_seq_len=64, truncation="truncate"))
    assert truncated == 1 and not skipped
    assert labelled_text(tiny_tokenizer, data[0]) == "5<|im_end|>"


def test_parquet_and_saved_dataset_directories(tmp_path, tiny_tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "Add 1 and 2", "response": "3"}] * 3)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        data, _, _ = tokenize_source(str(source), tiny_tokenizer, DataConfig())
        assert len(data) == 3 and labelled_text(tiny_tokenizer, data[0]) == "3<|im_end|>"


def test_missing_file_and_offline_hub_name_are_clear_errors(tmp_path, tiny_tokenizer, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        tokenize_source(str(tmp_path / "absent.jsonl"), tiny_tokenizer, DataConfig())
    # HF_HUB_OFFLINE is read when the libraries are imported: set their flags (the environment variable now
    # would leave datasets retrying the hub for ~25 s)
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="OfflineModeIsEnabled.*Offline\\? Download it elsewhere"):
        tokenize_source("some-org/some-dataset", tiny_tokenizer, DataConfig())


def test_tokenisation_is_cached_and_reused(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 5)
    first, _, _ = tokenize_source(path, tiny_tokenizer, DataConfig())
    second, _, _ = tokenize_source(path, tiny_tokenizer, DataConfig(shuffle_buffer=5))  # shuffling touches no token
    assert first.cache_files and first.cache_files == second.cache_files


def test_eval_split_is_held_out(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Add {i} and 1", "response": str(i + 1)} for i in range(50)])
    data = load_tokenized(DataConfig(source=path, eval_split=0.2), tiny_tokenizer, seed=42)
    assert len(data.train) == 40 and len(data.eval) == 10


def test_byte_order_mark_and_upper_case_suffix(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.JSONL"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n")
    data, skipped, _ = tokenize_source(str(path), tiny_tokenizer, DataConfig())
    assert len(data) == 1 and not skipped


def test_a_valid_row_may_contain_the_replacement_character(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "what is \ufffd?", "response": "U+FFFD"}])
    data, skipped, _ = tokenize_source(path, tiny_tokenizer, DataConfig())
    assert len(data) == 1 and not skipped
    assert "\ufffd" in tiny_tokenizer.decode(data[0]["input_ids"])


def test_csv_is_read(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.csv"
    path.write_text('prompt,response\n"Add 1 and 2",3\n')
    data, _, _ = tokenize_source(str(path), tiny_tokenizer, DataConfig())
    assert len(data) == 1 and labelled_text(tiny_tokenizer, data[0]) == "3<|im_end|>"


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_empty_file_is_a_clear_error(tmp_path, tiny_tokenizer, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=f"{name}: the file is empty"):
        tokenize_source(str(tmp_path / name), tiny_tokenizer, DataConfig())


def test_invalid_json_array_names_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "a", "response": "b"},\n{"prompt": "c", "response": }\n]\n')
    with pytest.raises(DataError, match=r"d.json: could not be read as json \(not valid JSON: .* at line 3"):
        tokenize_source(str(path), tiny_tokenizer, DataConfig())


def test_unknown_suffix_says_what_is_read(tmp_path, tiny_tokenizer):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"a .txt file; --data reads .jsonl, .json, .parquet, .csv"):
        tokenize_source(str(tmp_path / "d.txt"), tiny_tokenizer, DataConfig())


@pytest.mark.parametrize("source", ["./sft_typo", "{tmp}/sft_typo", "{tmp}/a/b", "{dir}/sft_typo"])
def test_local_looking_path_is_reported_missing_never_fetched(tmp_path, tiny_tokenizer, monkeypatch, source):
    """`data/sft_typo` beside a ./data directory is a typo of a local path, not the hub dataset data/sft_typo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    source = source.format(tmp=tmp_path, dir="data")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"{source} fetched from the hub"))
    with pytest.raises(DataError, match="no such file or directory"):
        tokenize_source(source, tiny_tokenizer, DataConfig())
