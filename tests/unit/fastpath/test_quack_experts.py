"""quack's gathered grouped GEMMs with SwiGLU fused give what the torch path gives: the expert rows' output and the
gradients of the tokens and of the three expert weights (GPU with quack-kernels only); where they cannot run, the
reason says what is missing."""
import importlib.util

import pytest
import torch

from helpers import max_rel_err
from qwen_moe_ft.fastpath import quack_experts

needs_quack = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("quack") is None,
                                 reason="quack's kernels need a CUDA GPU and quack-kernels")


def test_refusals_name_what_is_missing(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(quack_experts.importlib.util, "find_spec", lambda name: None)
    assert "pip install 'qwen-moe-ft[flash4]'" in quack_experts.unavailable_because(cpu, "swiglu")
    monkeypatch.setattr(quack_experts.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(quack_experts, "version", lambda name: "0.7.0")
    assert quack_experts.unavailable_because(cpu, "swiglu") == "written for quack-kernels 0.6.5, found 0.7.0"
    monkeypatch.setattr(quack_experts, "version", lambda name: quack_experts.QUACK_VERSION)
    assert "Hopper" in quack_experts.unavailable_because(cpu, "swiglu")


def _run(fn, leaves, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@needs_quack
@pytest.mark.parametrize("experts,hidden,inter,tokens,top_k", [(8, 256, 128, 512, 2), (128, 2048, 768, 1024, 8)])
def test_gathered_swiglu_experts_match_the_torch_path(experts, hidden, inter, tokens, top_k):
    """Against float32 on the torch path: bf16 products and sums in another order, so quack's error must stay
    within twice the bf16 torch path's own (~4e-3 of the largest value) plus a bf16 ulp."""
    from qwen_moe_ft.tools.expert_kernels import torch_chain

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    logits[:, -1] = float("-inf")  # an expert without rows: its weight gradients must be zeros, not left unwritten
    selected = logits.topk(top_k, dim=-1).indices
    rows = torch.argsort(selected.view(-1), stable=True)
    counts = torch.bincount(selected.view(-1), minlength=experts)
    x = torch.randn(tokens, hidden, device="cuda", generator=g)
    w1, w3 = (torch.randn(experts, inter, hidden, device="cuda", generator=g) * hidden ** -0.5 for _ in range(2))
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=g) * inter ** -0.5
    grad_out = torch.randn(tokens * top_k, hidden, device="cuda", generator=g)
    leaves = [x, w1, w2, w3]

    def torch_path(*t):
        return torch_chain(*t, rows, counts, top_k)

    def quack_path(*t):
        return quack_experts.gathered_swiglu_experts(*t, rows, counts, top_k)

    exact = _run(torch_path, leaves, grad_out)
    bf16 = _run(torch_path, [t.bfloat16() for t in leaves], grad_out)
    ours = _run(quack_path, [t.bfloat16() for t in leaves], grad_out)
    for name, want, theirs, got in zip(("out", "x", "w1", "w2", "w3"), exact, bf16, ours):
        assert got.shape == want.shape and got.is_contiguous(), name
        assert max_rel_err(got, want) <= 2 * max_rel_err(theirs, want) + 4e-3, name
    assert all((grad[-1] == 0).all() for grad in ours[2:]), "the unchosen expert's weight gradients"
