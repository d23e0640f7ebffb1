import json

import pytest
import torch

from qwen_moe_ft.bench.harness import (markdown_table, require_cuda, reserved_by_stream, segment_growth, tool_parser,
                                       write_report)


def test_markdown_table_with_and_without_its_header():
    assert markdown_table(("op", "ms"), [("mm", 1.5), ("add", "")]).splitlines() == [
        "| op | ms |", "| --- | --- |", "| mm | 1.5 |", "| add |  |"]
    assert markdown_table(("op", "ms"), [("mm", 1.5)], with_header=False) == "| mm | 1.5 |"


def test_the_parser_is_named_for_the_module_and_keeps_the_docstrings_lines():
    parser = tool_parser("qwen_moe_ft.tools.some_tool", "First line.\n\n    python -m qwen_moe_ft.tools.some_tool\n")
    text = parser.format_help()
    assert text.startswith("usage: python -m qwen_moe_ft.tools.some_tool")
    assert "\n    python -m qwen_moe_ft.tools.some_tool\n" in text


def test_the_report_names_the_gpu_and_torch_first(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    write_report(tmp_path / "r.json", rows=[{"ms": 1.0}])
    assert json.loads((tmp_path / "r.json").read_text()) == dict(gpu="NVIDIA H200", torch=torch.__version__,
                                                                 rows=[{"ms": 1.0}])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_a_tool_stops_with_one_line():
    with pytest.raises(SystemExit, match="^error: op_costs measures on a CUDA GPU, and there is none here$"):
        require_cuda("op_costs")


def test_reserved_memory_is_summed_per_stream_and_named():
    gib = 2**30
    segments = [dict(stream=0, total_size=2 * gib, allocated_size=gib),
                dict(stream=0x55, total_size=6 * gib, allocated_size=gib // 2),
                dict(stream=0x55, total_size=2 * gib, allocated_size=0),
                dict(stream=0x77, total_size=gib, allocated_size=gib)]
    assert reserved_by_stream(segments, {0: "default", 0x55: "current"}) == {
        "current": dict(reserved_gib=8.0, allocated_gib=0.5, segments=2),
        "default": dict(reserved_gib=2.0, allocated_gib=1.0, segments=1),
        "stream 0x77": dict(reserved_gib=1.0, allocated_gib=1.0, segments=1)}
    assert list(reserved_by_stream(segments, {})) == ["stream 0x55", "stream 0x0", "stream 0x77"]


def test_pool_growth_is_told_per_stream_by_the_innermost_frame_outside_torch():
    torch_frame = dict(filename="/venv/lib/python3.12/site-packages/torch/nn/functional.py", line=10, name="linear")
    ours = dict(filename="/work/main/qwen_moe_ft/fastpath/quack_experts.py", line=163, name="forward")
    hook = dict(filename="/venv/lib/python3.12/site-packages/deepspeed/runtime/zero/stage_1_and_2.py", line=9,
                name="grad_hook")
    gib = 2**30
    traces = [dict(action="segment_alloc", stream=0x55, size=2 * gib, frames=[torch_frame, ours]),
              dict(action="alloc", stream=0x55, size=gib, frames=[hook]),  # from a cached segment: no growth
              dict(action="segment_alloc", stream=0x55, size=gib, frames=[ours]),
              dict(action="segment_alloc", stream=0, size=gib // 2, frames=[hook, ours]),
              dict(action="segment_alloc", stream=0, size=gib // 4, frames=[torch_frame]),
              dict(action="segment_free", stream=0, size=gib // 2, frames=[])]
    assert segment_growth(traces, {0x55: "current", 0: "default"}) == {
        "current": [["qwen_moe_ft/fastpath/quack_experts.py:163:forward", 3.0, 2]],
        "default": [["deepspeed/runtime/zero/stage_1_and_2.py:9:grad_hook", 0.5, 1],
                    ["(no Python frame outside torch)", 0.25, 1]]}
    assert segment_growth(traces, {}, top=1)["stream 0x0"] == [["deepspeed/runtime/zero/stage_1_and_2.py:9:grad_hook",
                                                               0.5, 1]]


@pytest.mark.gpu
def test_a_side_streams_memory_and_the_site_that_grew_it_are_told_from_torchs_own_records():
    side = torch.cuda.Stream()
    torch.cuda.memory._record_memory_history(stacks="python")
    try:
        with torch.cuda.stream(side):
            held = torch.empty(48 << 20, dtype=torch.uint8, device="cuda")  # a segment of its own, on the side stream
        traces = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        reserved = reserved_by_stream(torch.cuda.memory_snapshot(), {side.cuda_stream: "side"})
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    assert reserved["side"]["allocated_gib"] >= 48 / 1024
    grown = segment_growth(traces, {side.cuda_stream: "side"})["side"]
    site = grown[0][0]  # the innermost Python frame: this test, its path cut to three parts outside site-packages
    assert site.startswith("unit/bench/test_harness.py:") and site.endswith(
        ":test_a_side_streams_memory_and_the_site_that_grew_it_are_told_from_torchs_own_records")
    assert grown[0][1] >= 48 / 1024
    del held
