import json

import pytest
import torch

from qwen_moe_ft.bench.harness import markdown_table, require_cuda, tool_parser, write_report


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
