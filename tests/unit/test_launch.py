import pytest

from qwen_moe_ft.launch import _status, main


def test_a_process_status_becomes_the_runs_and_a_signal_128_plus_its_number():
    assert [_status(code) for code in (2, 1, -9, -15, 0)] == [2, 1, 137, 143, 1]  # 0: a failure said nothing


def test_only_torchrun_and_accelerate_are_launched():
    with pytest.raises(SystemExit, match=r"torchrun\|accelerate .*got 'deepspeed'"):
        main(["deepspeed", "train.py"])
