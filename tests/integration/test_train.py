"""Trainer behaviour across modes, on CPU processes with real DeepSpeed."""
import pytest

from helpers import SAMPLE, read_metrics, train, train_together


def epoch_loss(output_dir):
    steps = [m for m in read_metrics(output_dir) if "eval_loss" not in m]
    tokens = sum(m["num_label_tokens"] for m in steps)
    return sum(m["loss"] * m["num_label_tokens"] for m in steps) / tokens, tokens, len(steps)


def test_packed_and_unpacked_optimise_the_same_objective(tmp_path):
    rows = tmp_path / "rows.jsonl"  # a fifth of the sample: an epoch of each is enough to compare
    rows.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:600]))
    common = ["--data", str(rows), "--epochs", "1", "--lr", "0", "--max-tokens-per-batch", "2048",
              "--max-seq-len", "512", "--export-hf", "false"]
    # one process each, both at once (ranks' label-count normalisation: test_four_ranks.py)
    train_together([(tmp_path / mode, [*common, "--packing", flag])
                    for mode, flag in (("packed", "true"), ("unpacked", "false"))])
    packed_loss, packed_tokens, packed_steps = epoch_loss(tmp_path / "packed")
    unpacked_loss, unpacked_tokens, unpacked_steps = epoch_loss(tmp_path / "unpacked")
    assert packed_tokens == unpacked_tokens
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    assert packed_steps < unpacked_steps


def test_bad_option_fails_before_loading_with_its_name(tmp_path):
    proc = train(tmp_path, "--ep-size", "3", nproc=1, check=False)
    assert proc.returncode != 0
    assert "--ep-size 3" in proc.stderr


def test_bad_row_stops_every_rank_with_one_message(tmp_path):
    rows = SAMPLE.read_text().splitlines(keepends=True)[:20]
    rows[9] = "{not json\n"
    (tmp_path / "rows.jsonl").write_text("".join(rows))
    proc = train(tmp_path / "out", "--data", str(tmp_path / "rows.jsonl"), nproc=2, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("error: ") == 1 and "1 bad row(s) ({'bad_json': 1}), first:\n  row 10: bad_json" in output
    # no rank's traceback: neither the one that read the row nor a peer left waiting on it (torchrun's own report
    # of the ranks' exit status 2 follows any failed run)
    assert "[rank" not in output and "Connection closed" not in output


def test_missing_model_says_how_to_point_at_a_local_copy(tmp_path):
    proc = train(tmp_path, "--model", str(tmp_path / "no-such-model"), nproc=1, check=False)
    assert proc.returncode != 0
    assert (f"error: {tmp_path / 'no-such-model'}: no such directory; --model (and --tokenizer) take a directory "
            "written by save_pretrained or `hf download`") in proc.stderr

