"""The Triton RMSNorm computes what Qwen3's RMSNorm computes, forward and backward, at the q/k and hidden widths."""
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from helpers import max_rel_err
from qwen_moe_ft.fastpath.norms import HEAD_NORMS, triton_norms
from qwen_moe_ft.fastpath.rms_norm import MAX_WIDTH, rms_norm, unavailable_because

EPS = 1e-6


def _fp32_reference(x, weight, dy):
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    y = w32 * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS))
    y.backward(dy.float())
    return y.detach(), x32.grad, w32.grad


def test_refused_without_a_gpu_or_past_the_widest_row():
    from transformers import AutoModelForCausalLM

    from helpers import TINY

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    assert triton_norms(model, torch.device("cpu"), HEAD_NORMS).refused == "needs a GPU and triton"
    assert not any("forward" in vars(m) for m in model.modules())  # nothing rebound
    assert triton_norms(torch.nn.Linear(2, 2), torch.device("cpu"), HEAD_NORMS).refused == \
        "no q_norm or k_norm RMSNorm in the model"
    if unavailable_because(torch.device("cuda"), 128) == "":  # triton installed: the width is what refuses
        assert unavailable_because(torch.device("cuda"), MAX_WIDTH + 1) == (
            f"rows of {MAX_WIDTH + 1} are wider than {MAX_WIDTH}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 32, 128), (8192, 4, 128), (77, 3, 128), (5, 24), (8192, 2048), (3, 2000)])
def test_forward_and_gradients_match_qwen3s_norm(shape):
    """Rows of the q norm at 8192 tokens, the k norm, a row count that fills no block, a width below one block, the
    hidden norms' rows and a hidden width that fills no block."""
    torch.manual_seed(0)
    width = shape[-1]
    stock = Qwen3MoeRMSNorm(width, eps=EPS).cuda().to(torch.bfloat16)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5)  # away from 1, so that a weight applied wrongly shows
    x = (torch.randn(shape, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(shape, device="cuda").to(torch.bfloat16)
    y_stock = stock(x)
    y_stock.backward(dy)
    weight = stock.weight.detach().clone().requires_grad_()
    ours_x = x.detach().clone().requires_grad_()
    y = rms_norm(ours_x, weight, EPS)
    y.backward(dy)
    # Forward: the same arithmetic and roundings. The reciprocal square root and the row sum's order may differ by an
    # fp32 ulp; where that moves the normalised value across a bf16 rounding boundary (chance ~2^-15 an element) it
    # differs by one bf16 ulp (<= 2^-7 relative), and the product's rounding then adds at most half an ulp on each
    # side: within 2^-6 of y, and rare, where a systematic error (a truncation, a wrong weight) moves most elements
    assert y.shape == y_stock.shape and y.dtype == y_stock.dtype
    difference = (y.float() - y_stock.float()).abs()
    assert (difference <= y_stock.float().abs() * 2**-6).all()
    assert (difference > 0).float().mean() < 1e-3
    # Gradients against fp32: each is rounded to bf16 once at the end (2^-9 relative), the stock autograd rounds
    # twice on the way; ours may not be further off than the stock module plus one rounding of the largest value
    _, dx_ref, dw_ref = _fp32_reference(x, stock.weight, dy)
    assert max_rel_err(ours_x.grad, dx_ref) <= max_rel_err(x.grad, dx_ref) + 2**-8
    assert max_rel_err(weight.grad, dw_ref) <= max_rel_err(stock.weight.grad, dw_ref) + 2**-8
    assert max_rel_err(ours_x.grad, dx_ref) < 2**-6 and max_rel_err(weight.grad, dw_ref) < 2**-6


@pytest.mark.gpu
def test_the_fast_path_puts_the_norms_on_it_where_quack_is_refused():
    from transformers import AutoModelForCausalLM

    from helpers import TINY
    from qwen_moe_ft.fastpath import FastPath

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16).cuda()
    fast = FastPath()
    try:
        fast.prepare_model(model, "liger", "cuda")
        applied = {a.name for a in fast.applied if a}
        head = "quack_head_norms" if "quack_head_norms" in applied else "triton_head_norms"
        assert {"triton_hidden_norms", head} <= applied
        forwards = {name.rsplit(".", 1)[-1]: m.forward.__func__.__name__ for name, m in model.named_modules()
                    if name.endswith(("norm", "layernorm"))}
        hidden = (forwards["input_layernorm"], forwards["post_attention_layernorm"], forwards["norm"])
        assert hidden == ("_triton_rms_norm",) * 3
        assert forwards["q_norm"] == forwards["k_norm"] == ("_quack_rms_norm" if head == "quack_head_norms"
                                                            else "_triton_rms_norm")
    finally:
        fast.restore()
