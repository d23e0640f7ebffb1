import torch

from qwen_moe_ft.bench.kernel_table import (format_per_layer, per_layer_table, profile_step, profile_steps,
                                            slowest_against_fastest)


def _step(layers: int):
    x = torch.randn(64, 64)

    def run(timer):
        timer.begin()
        y = x
        for _ in range(layers):
            y = torch.mm(y, x)
        timer.mark("forward_backward")
        for _ in range(layers):
            y = torch.add(y, 1.0)

    return run


def test_ops_are_split_at_the_forward_backward_mark():
    table = profile_step(_step(3), device="cpu")  # CPU tensors: their ops are the rows, GPU or not
    assert table["aten::mm"]["calls"] == 3
    assert table["aten::mm"]["forward_backward"] > 0 and table["aten::mm"]["optimizer"] == 0
    assert table["aten::add"]["calls"] == 3
    assert table["aten::add"]["optimizer"] > 0 and table["aten::add"]["forward_backward"] == 0


def test_per_layer_table_is_the_depth_difference():
    low = {"gemm": {"forward_backward": 100.0, "optimizer": 10.0, "calls": 4}, "only_low": {"forward_backward": 5.0, "optimizer": 0.0, "calls": 1}}
    high = {"gemm": {"forward_backward": 300.0, "optimizer": 30.0, "calls": 8}, "adam": {"forward_backward": 0.0, "optimizer": 50.0, "calls": 2}}
    rows = {r["kernel"]: r for r in per_layer_table(low, high, span=2)}
    assert rows["gemm"] == {"kernel": "gemm", "forward_backward": 100.0, "optimizer": 10.0, "calls": 2.0, "total": 110.0}
    assert rows["adam"]["optimizer"] == 25.0 and rows["only_low"]["forward_backward"] == -2.5
    text = format_per_layer(list(rows.values()))
    assert text.splitlines()[0] == "per layer: forward+backward 0.10 ms, optimizer 0.04 ms of device time"


def test_a_kernel_the_profiler_also_hands_to_a_runtime_call_counts_once():
    """As an H100 profile had it: the LM head's backward GEMM listed under its op and under cudaStreamIsCapturing,
    which counted it twice; a kernel that only a runtime call lists is still counted, as "(no op)"."""
    from types import SimpleNamespace

    from qwen_moe_ft.bench.kernel_table import MARK_PREFIX, phase_table
    from torch.autograd import DeviceType

    def span(start, us=0.0):
        return SimpleNamespace(start=start, elapsed_us=lambda: us)

    def cpu(name, start, kernels=(), parent=None):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, time_range=span(start), cpu_parent=parent,
                               kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels])

    def device(name, start, us):
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, time_range=span(start, us),
                               is_user_annotation=False)

    backward = cpu("autograd::engine::evaluate_function: MmBackward0", 5)
    events = [backward, cpu("aten::mm", 10, [("gemm", 6000.0)], parent=backward),
              cpu("cudaStreamIsCapturing", 11, [("gemm", 6000.0)]), cpu("cudaStreamWaitEvent", 20, [("memset", 2.0)]),
              device("gemm", 12, 6000.0), device("memset", 21, 2.0), cpu(MARK_PREFIX + "forward_backward", 100)]
    assert phase_table(events) == {
        "bwd MmBackward0 > aten::mm | gemm": {"forward_backward": 6000.0, "optimizer": 0.0, "calls": 1},
        "(no op) | memset": {"forward_backward": 2.0, "optimizer": 0.0, "calls": 1}}


def test_profiler_bookkeeping_is_not_a_kernels_op():
    from types import SimpleNamespace

    from qwen_moe_ft.bench.kernel_table import _context

    def event(name, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent)

    mm = event("aten::_grouped_mm", event("Activity Buffer Request", event("_GateUpGroupedMm")))
    assert _context(mm) == "_GateUpGroupedMm > aten::_grouped_mm"
    assert _context(event("Activity Buffer Request", event("aten::cat"))) == "aten::cat"
    assert _context(event("aten::mm", event("autograd::engine::evaluate_function: MmBackward0"))) == \
        "bwd MmBackward0 > aten::mm"


def test_step_timelines_time_each_forward_backward():
    x = torch.randn(256, 256)

    def run(timer, i):
        timer.begin()
        y = x
        for _ in range(2 + 4 * i):  # the last step does the most work
            y = torch.mm(y, x)
        timer.mark("forward_backward")
        torch.add(y, 1.0)

    steps = profile_steps(run, 3, device="cpu")
    assert [list(s["kernels"]) for s in steps] == [["aten::mm"]] * 3  # the add is after the mark
    assert [s["launches"] for s in steps] == [2, 6, 10]
    for s in steps:  # one thread's ops do not overlap: busy is their sum, and within the wall time
        assert abs(s["busy_ms"] - s["kernels_ms"]) <= 1e-6 * s["kernels_ms"] and s["busy_ms"] <= s["wall_ms"]
    compared = slowest_against_fastest(steps)
    fastest, slowest = compared["wall_ms"]
    assert fastest <= slowest and compared["kernels_us"][0][0] == "aten::mm"
