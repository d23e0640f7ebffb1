import pytest

from qwen_moe_ft.config import ConfigError, TrainConfig
from qwen_moe_ft.output_dir import check_output_dir, clear_earlier_run


def earlier_run(out):
    (out / "checkpoints" / "step-210").mkdir(parents=True)
    (out / "hf").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("the user's own file")


def test_fresh_run_into_an_earlier_run_stops_and_says_what_to_do(tmp_path):
    earlier_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_output_dir(str(tmp_path), resume="", overwrite=False)
    message = str(err.value)
    for expected in ("metrics.jsonl", "checkpoints", "hf", "--resume latest", "--overwrite-output-dir true"):
        assert expected in message


def test_resume_and_overwrite_may_use_it_and_an_empty_dir_is_fresh(tmp_path):
    check_output_dir(str(tmp_path), resume="", overwrite=False)
    earlier_run(tmp_path)
    check_output_dir(str(tmp_path), resume="latest", overwrite=False)
    check_output_dir(str(tmp_path), resume="", overwrite=True)


def test_overwrite_removes_the_run_and_nothing_else(tmp_path):
    earlier_run(tmp_path)
    assert clear_earlier_run(tmp_path) == ["metrics.jsonl", "checkpoints", "hf"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    check_output_dir(str(tmp_path), resume="", overwrite=False)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ConfigError, match="--output-dir .* is a file"):
        check_output_dir(str(tmp_path / "out"), resume="", overwrite=False)


def test_overwrite_and_resume_together_is_refused():
    with pytest.raises(ConfigError, match="--overwrite-output-dir"):
        TrainConfig.from_flat(overwrite_output_dir=True, resume="latest").validate()
