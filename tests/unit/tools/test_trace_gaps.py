"""trace_gaps on a small hand-made trace: each gap of the GPU charged to the op whose launch ended it, and split
into forward and backward at the backward thread's first kernel."""
import gzip
import json

import pytest

from qwen_moe_ft.tools.trace_gaps import forward_host_ops, main, step_gaps


def op(tid, name, ts, dur):
    return {"cat": "cpu_op", "name": name, "tid": tid, "ts": ts, "dur": dur}


def launch(tid, ts, correlation):
    return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": ts, "dur": 1,
            "args": {"correlation": correlation}}


def kernel(ts, dur, correlation):
    return {"cat": "kernel", "name": f"k{correlation}", "tid": 7, "ts": ts, "dur": dur,
            "args": {"correlation": correlation}}


def mark(name, ts):
    return {"cat": "user_annotation", "name": f"qwen_moe_ft.bench.mark:{name}", "tid": 1, "ts": ts, "dur": 0}


EVENTS = [
    mark("begin", 0), mark("forward_backward", 100), mark("begin", 200),  # a begin without its mark: no step
    op(1, "aten::mm", 0, 10), launch(1, 5, 1), kernel(6, 10, 1),            # idle 0-6: forward, aten::mm
    op(1, "aten::add_", 20, 10), launch(1, 25, 2), kernel(26, 4, 2),        # idle 16-26: forward, aten::add_
    op(1, "aten::empty", 21, 2),                                            # inside aten::add_
    op(2, "autograd::engine::evaluate_function: MmBackward0", 40, 20),
    op(2, "aten::mm", 41, 18), launch(2, 50, 3), kernel(52, 40, 3),         # idle 30-52: backward, aten::mm
    op(1, "aten::add_", 110, 5), launch(1, 111, 4), kernel(120, 5, 4),      # after the mark: not in the step
]


def test_gaps_are_split_at_the_backward_and_charged_to_the_launching_op():
    steps, charged = step_gaps(EVENTS, min_gap_us=5)
    assert steps == [dict(wall_ms=0.1, forward_ms=0.052, forward_idle_ms=0.016, backward_ms=0.048,
                          backward_idle_ms=0.022)]
    assert charged == {"aten::mm": [2, 28.0], "aten::add_": [1, 10.0]}
    assert step_gaps(EVENTS, min_gap_us=7)[1] == {"aten::mm": [1, 22.0], "aten::add_": [1, 10.0]}


def test_the_forwards_host_time_is_split_over_its_outermost_ops():
    spans, by_op = forward_host_ops(EVENTS)
    assert spans == [dict(host_ms=0.04, in_ops_ms=0.02)]  # begin to the backward's first op, 40 us
    assert by_op == {"aten::mm": [1, 10.0], "aten::add_": [1, 10.0]}


def test_cli_reads_gzipped_traces_and_refuses_traces_without_steps(tmp_path, capsys):
    path = tmp_path / "run_ours_4L.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 0.10 | 0.05 (0.02) | 0.05 (0.02) |" in out and "| aten::mm | 2 | 0.03 |" in out
    assert "ms a step: 0.04 (0.02 in ops)" in out and "| aten::add_ | 1 | 0.01 | 10.0 |" in out
    plain = tmp_path / "empty.json"
    plain.write_text(json.dumps({"traceEvents": EVENTS[3:]}))
    with pytest.raises(SystemExit, match="no step between a begin and a forward_backward mark"):
        main([str(plain)])
