"""The routing score folded into the experts' SwiGLU: the kernels against the fp32 formula, and the EP=1 block that
takes them (one_rank_dispatch over LayoutPreservingGateUp experts) against AutoEP's own forward, whose combine
weights the expert output rows instead."""
import copy

import pytest
import torch
import torch.nn.functional as F
from deepspeed.module_inject import auto_ep_layer
from deepspeed.ops.triton_ops import autoep_fused_token_ops, swiglu_triton
from transformers import AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.fastpath import scored_swiglu as scored
from qwen_moe_ft.fastpath.expert_mlp import use_layout_preserving_gate_up
from qwen_moe_ft.fastpath.local_dispatch import one_rank_dispatch, scores_in_experts
from qwen_moe_ft.parallel.ds_config import build_ds_config
from qwen_moe_ft.parallel.expert_parallel import apply_autoep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _formula(gate_up, scores, grad):
    """scores * silu(gate) * up and its gradients, by autograd, in fp32."""
    gate_up = gate_up.detach().float().requires_grad_(True)
    scores = scores.detach().float().requires_grad_(True)
    gate, up = gate_up.chunk(2, dim=-1)
    out = scores[:, None] * F.silu(gate) * up
    out.backward(grad.float())
    return out.detach(), gate_up.grad, scores.grad


def _inputs(rows, inter, dtype, device):
    g = torch.Generator().manual_seed(rows + inter)
    gate_up = (3 * torch.randn(rows, 2 * inter, generator=g)).to(device, dtype)
    scores = torch.rand(rows, generator=g).to(device)
    grad = torch.randn(rows, inter, generator=g).to(device, dtype)
    return gate_up, scores, grad


def _assert_rounded_from(ours, reference, dtype):
    """ours: the fp32 reference rounded once to dtype, within one ulp of each value (2**-7 in bf16; 2**-20, a few
    roundings, in fp32: fp32 operations in another order can move a value across a rounding boundary), and 1e-6 of
    the largest element where sigmoid's derivative 1 + gate * (1 - sigmoid(gate)) cancels (gate near -1.28: there
    the fp32 roundings of its terms, ~1e-7 of them, are all that is left)."""
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-20
    largest = reference.abs().max().item() if reference.numel() else 0.0
    torch.testing.assert_close(ours.float(), reference, rtol=ulp, atol=1e-6 * largest)


def _assert_score_grad(ours, reference, grad, gate_up):
    """The scores' gradient sum_j grad[j] * h[j] is fp32 throughout: its terms summed in another order differ by
    a few fp32 roundings of their absolute sum (2**-24 each), here bounded at 1e-5 of it."""
    inter = gate_up.shape[1] // 2
    terms = (grad.float() * F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).abs().sum(dim=-1)
    assert ours.dtype == torch.float32
    assert ((ours - reference).abs() <= 1e-5 * terms + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_formula_is_autograds_of_the_scored_swiglu(dtype):
    """CPU tensors: the same formula in fp32, rounded once to the rows' dtype; the scores' gradient in fp32."""
    gate_up, scores, grad = _inputs(37, 48, dtype, "cpu")
    gate_up.requires_grad_(True)
    scores.requires_grad_(True)
    out = scored.scored_swiglu(gate_up, scores)
    out.backward(grad)
    ref_out, ref_grad_gate_up, ref_grad_scores = _formula(gate_up.detach(), scores.detach(), grad)
    assert out.dtype == gate_up.grad.dtype == dtype
    assert torch.equal(out, ref_out.to(dtype))  # the same fp32 operations in the same order
    _assert_rounded_from(gate_up.grad, ref_grad_gate_up, dtype)
    _assert_score_grad(scores.grad, ref_grad_scores, grad, gate_up.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("rows, inter", [(8192 * 8, 768), (1003, 768), (37, 48), (5, 100), (3, 1000), (0, 768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernels_match_the_fp32_formula(rows, inter, dtype):
    """The real width (I = 768: three column blocks), row counts that do not fill a program's rows, widths that do
    not fill a block, no rows at all."""
    gate_up, scores, grad = _inputs(rows, inter, dtype, "cuda")
    out = scored.scored_swiglu_forward_triton(gate_up, scores)
    grad_gate_up, grad_scores = scored.scored_swiglu_backward_triton(grad, gate_up, scores)
    ref_out, ref_grad_gate_up, ref_grad_scores = _formula(gate_up, scores, grad)
    assert out.dtype == grad_gate_up.dtype == dtype
    _assert_rounded_from(out, ref_out, dtype)
    _assert_rounded_from(grad_gate_up, ref_grad_gate_up, dtype)
    _assert_score_grad(grad_scores, ref_grad_scores, grad, gate_up)


@pytest.fixture(scope="module")
def moe_block(process_group):
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    apply_autoep(model, build_ds_config(ep_size=1, world_size=1, device_type=DEVICE), rank=0)
    return model.model.layers[0].mlp


def _on_cpu(block, dtype=torch.float32):
    """A copy on CPU tensors, with the weighted combine's torch form where the config chose its CUDA kernel (the
    same sum: ds_config.py)."""
    block = copy.deepcopy(block).to("cpu", dtype)
    if block.combine_impl == "fused_weighted_sum":
        block.combine_impl = "weighted_sum"
    return block


def _run(block, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out)
    return [out, x.grad] + [p.grad for _, p in sorted(block.named_parameters())]


def _scored(block, monkeypatch):
    """The block on the fast path's experts and dispatch, AutoEP's forward and weighted combines made to fail."""
    block = copy.deepcopy(block)
    assert use_layout_preserving_gate_up(block) and one_rank_dispatch(block)

    def must_not_run(*args, **kwargs):
        raise AssertionError("AutoEP's forward or weighted combine ran on the scored path")

    monkeypatch.setattr(auto_ep_layer, "combine_from_routed", must_not_run)
    monkeypatch.setattr(autoep_fused_token_ops, "fused_weighted_restore", must_not_run)
    monkeypatch.setattr(auto_ep_layer.AutoEPMoELayer, "_forward", must_not_run)
    assert scores_in_experts(block, pad_rows=False)
    return block


def _names(block):
    return ["output", "x"] + [name for name, _ in sorted(block.named_parameters())]


def test_scored_block_gives_autoeps_output_and_gradients_in_fp32(moe_block, monkeypatch, deepspeed_swiglu_in_torch):
    """fp32 on CPU: the score multiplies h before the down GEMM's sum instead of its result, so the two differ by
    fp32 roundings (2**-24 of a value each, a few along the way: measured 3.2e-7 of the largest element), where a
    score missing or applied twice is off by O(1) of it. Output, x and every parameter's gradient (router gate,
    w1, w2, w3) within 1e-6 of their largest element."""
    torch.manual_seed(1)
    x = torch.randn(2, 40, moe_block.router.gate.in_features)
    grad_out = torch.randn_like(x)
    block = _on_cpu(moe_block)
    reference = _run(copy.deepcopy(block), x, grad_out)
    ours = _run(_scored(block, monkeypatch), x, grad_out)
    assert len(ours) == 6  # output, x, router gate, w1, w2, w3
    for name, a, b in zip(_names(moe_block), ours, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert max_rel_err(a, b) < 1e-6, name


def test_scored_block_in_bf16_is_as_accurate_as_autoeps(moe_block, monkeypatch):
    """bf16 (on the GPU where there is one: Triton kernels on both sides). Both runs round differently (the score
    before the down GEMM instead of after the combine), so each is compared with AutoEP's forward in fp32 on the
    same bf16 inputs and weights: ours may be off by no more than twice AutoEP's own bf16 error, or 2**-8 (one bf16
    rounding, 2**-9 of a value, twice) of the largest element where AutoEP happens to round closer (measured on CPU:
    at most 1.3x AutoEP's error, 5.6e-3). Ours and AutoEP's bf16 results then differ by less than 2**-6."""
    block = copy.deepcopy(moe_block).to(DEVICE, torch.bfloat16)
    torch.manual_seed(2)
    x = torch.randn(2, 40, block.router.gate.in_features, device=DEVICE, dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)
    stock = _run(copy.deepcopy(block), x, grad_out)
    with monkeypatch.context() as cpu_swiglu:  # fp32 on CPU tensors, even on a machine with a GPU
        cpu_swiglu.setattr(swiglu_triton, "_TRITON_AVAILABLE", False)
        exact = _run(_on_cpu(block), x.cpu().float(), grad_out.cpu().float())
    ours = _run(_scored(block, monkeypatch), x, grad_out)
    for name, a, b, e in zip(_names(block), ours, stock, exact):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape, name
        ours_err, stock_err = max_rel_err(a.cpu(), e), max_rel_err(b.cpu(), e)
        assert ours_err <= max(2 * stock_err, 2**-8), (name, ours_err, stock_err)
        assert max_rel_err(a, b) < 2**-6, name


def test_scores_go_into_the_experts_only_where_the_block_takes_them_after(moe_block):
    """Scores applied before the experts ("pre"), padded rows (AutoEP's Triton grouped GEMM), AutoEP's own expert
    forward (LoRA, frozen experts) or another activation than plain SwiGLU: the weighted combine stays."""
    block = _on_cpu(moe_block)
    assert not scores_in_experts(block, pad_rows=False)  # AutoEP's expert forward
    (forward,) = use_layout_preserving_gate_up(block)
    assert scores_in_experts(block, pad_rows=False) and not scores_in_experts(block, pad_rows=True)
    block.score_apply = "pre"
    assert not scores_in_experts(block, pad_rows=False)
    block.score_apply = "post"
    block.experts.activation = "swiglu_clamped"  # reads activation_limit: no scored form here
    assert not scores_in_experts(block, pad_rows=False)
    x = torch.randn(4, block.experts.w1.shape[2])
    counts = torch.zeros(block.experts.num_experts, dtype=torch.long)
    counts[0] = 4
    with pytest.raises(ValueError, match="plain SwiGLU"):
        forward(x, counts, scores=torch.ones(4))


def test_scored_experts_are_the_experts_rows_scaled(moe_block):
    """The experts' forward with scores is their output rows each times its score (fp32 roundings apart)."""
    block = _on_cpu(moe_block)
    (forward,) = use_layout_preserving_gate_up(block)
    counts = torch.tensor([5, 0, 3, 9, 1, 0, 2, 4])  # the tiny model's 8 experts, empty ones too
    x = torch.randn(int(counts.sum()), block.experts.w1.shape[2])
    scores = torch.rand(x.shape[0])
    assert max_rel_err(forward(x, counts, scores=scores), forward(x, counts) * scores[:, None]) < 1e-6
