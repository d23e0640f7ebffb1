import pytest
import torch

from qwen_moe_ft.tools.adamw_kernel import LayerUpdate, layer_shapes, main, table


def test_the_timed_update_writes_the_bf16_copy_and_the_gate_up_mirror_of_a_layer():
    shapes = [("w1", (3, 4, 8)), ("w3", (3, 4, 8)), ("w2", (3, 8, 4)), ("norm", (8,))]
    update = LayerUpdate(torch.bfloat16, shapes, device="cpu")
    before = update.master.clone()
    update()
    assert not torch.equal(update.master, before)
    assert torch.equal(update.out, update.master.bfloat16())
    w1, w3 = update.out[:96].view(3, 4, 8), update.out[96:192].view(3, 4, 8)
    assert torch.equal(update.gate_up, torch.cat([w1, w3], dim=1))
    assert update.bytes == 296 * 20 + 192 * 2  # 20 bytes an element with bf16 moments, 2 more for the mirror
    assert LayerUpdate(torch.bfloat16, shapes, device="cpu", mirror=False).bytes == 296 * 20


def test_a_layer_is_the_models_623m_parameters():
    assert sum(torch.Size(shape).numel() for _, shape in layer_shapes()) == 623_120_640


def test_table_marks_the_configured_kernel():
    rows = [dict(moments="bf16", block=4096, warps=8, ms=3.0, gb=12.88, tb_per_s=4.29, configured=True),
            dict(moments="bf16", block=2048, warps=4, ms=3.5, gb=12.88, tb_per_s=3.68, configured=False),
            dict(moments="bf16", mirror=False, block=4096, warps=8, ms=3.2, gb=12.5, tb_per_s=3.9, configured=True)]
    lines = table(rows).splitlines()
    assert lines[2] == "| bf16 | 4096 x 8 (configured) | 3.000 | 12.88 | 4.29 |"
    assert lines[3] == "| bf16 | 2048 x 4 | 3.500 | 12.88 | 3.68 |"
    assert lines[4] == "| bf16, no gate/up mirror | 4096 x 8 (configured) | 3.200 | 12.50 | 3.90 |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        main([])
