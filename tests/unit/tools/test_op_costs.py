import pytest
import torch
import torch.nn.functional as F

from qwen_moe_ft.tools.op_costs import main, rms_norm_errors, table


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(64, 2048, generator=g).to(dtype) for _ in range(2))
    return x, (torch.rand(2048, generator=g) + 0.5).to(dtype), grad


def _torch_norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def test_norm_errors_are_rounding_in_fp32_and_bf16_and_large_for_a_wrong_norm():
    fp32 = rms_norm_errors(_torch_norm, *_inputs(torch.float32))
    assert max(fp32.values()) < 1e-6  # float32 roundings (2^-24) over a 2048-term mean
    bf16 = rms_norm_errors(_torch_norm, *_inputs(torch.bfloat16))
    assert 0 < bf16["out_error"] < 2 ** -7  # one bf16 rounding of the output (2^-9 relative), the weight's
    unweighted = rms_norm_errors(lambda x, w: _torch_norm(x, None), *_inputs(torch.float32))
    assert unweighted["out_error"] > 0.1  # weights of 0.5-1.5 left out


def test_table_shows_forward_only_rows_and_errors():
    rows = [dict(op="RMSNorm 8 x 2048", candidate="torch", host_us=23.25, gpu_us=24.4, fwd_bwd_host_us=160.0,
                 fwd_bwd_gpu_us=123.2, out_error=2e-3, dx_error=3e-3),
            dict(op="sort", candidate="int64 keys", host_us=130.9, gpu_us=81.8),
            dict(op="copy", candidate="kernel", host_us=5.0, gpu_us=6.0, exact=False)]
    lines = table(rows).splitlines()
    assert lines[4] == "| copy | kernel | 5.0 | 6.0 |  |  | DIFFERS |"
    assert lines[2] == "| RMSNorm 8 x 2048 | torch | 23.2 | 24.4 | 160.0 | 123.2 | 2.0e-03 / 3.0e-03 |"
    assert lines[3] == "| sort | int64 keys | 130.9 | 81.8 |  |  |  |"
    assert table(rows[1:2], header=False) == lines[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        main([])
