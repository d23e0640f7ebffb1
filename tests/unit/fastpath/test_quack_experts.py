"""quack's gathered grouped GEMMs with SwiGLU fused give what the torch path gives: the expert rows' output and the
gradients of the tokens and of the three expert weights (GPU with quack-kernels only); where they cannot run, the
reason says what is missing."""
import importlib.util

import pytest
import torch

from helpers import max_rel_err
from qwen_moe_ft.fastpath import quack_experts
from qwen_moe_ft.tools.expert_kernels import combined_torch_chain

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


# what quack-kernels 0.6.5 raised with nvidia-cutlass-dsl 4.8.1 installed by `pip install --target`
FINGERPRINT_ERROR = ("epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS' default=()> (type "
                     "_contextvars.ContextVar), which has no fail-closed semantic key. Supported: primitives")


def test_first_error_names_the_exception_and_its_first_line():
    def fails(message):
        def run():
            raise TypeError(message)
        return run

    assert quack_experts.first_error(fails(FINGERPRINT_ERROR + "\n  more")) == "TypeError: " + FINGERPRINT_ERROR
    assert quack_experts.first_error(fails("")) == "TypeError"
    assert len(quack_experts.first_error(fails("x" * 1000))) == quack_experts.MAX_REASON
    assert quack_experts.first_error(lambda: None) == ""


def test_probe_reports_the_chain_failure(monkeypatch):
    def chain(*args, **kwargs):
        raise TypeError(FINGERPRINT_ERROR)

    monkeypatch.setattr(quack_experts, "gathered_swiglu_experts", chain)
    assert quack_experts.probe(torch.device("cpu"), 64, 32, torch.float32) == "TypeError: " + FINGERPRINT_ERROR


def test_probe_passes_where_the_chain_runs_and_leaves_the_random_stream(monkeypatch):
    """On the torch chain (CPU): the probe's rows and counts are a valid routing, forward and backward run, and the
    global generator is where it was."""
    from qwen_moe_ft.tools.expert_kernels import torch_chain

    calls = []

    def chain(x, w1, w2, w3, rows, counts, top_k, gemms):
        calls.append((rows.tolist(), counts.tolist()))
        return torch_chain(x, w1, w2, w3, rows, counts, top_k)

    monkeypatch.setattr(quack_experts, "gathered_swiglu_experts", chain)
    state = torch.get_rng_state()
    assert quack_experts.probe(torch.device("cpu"), 64, 32, torch.float32) == ""
    assert torch.equal(torch.get_rng_state(), state)
    assert calls == [([0, 2, 4, 6, 1, 3, 5, 7], [4, 4])]  # tokens 0-3 routed to experts 0 and 1, in expert order


def test_probe_of_the_chain_with_the_combine_runs_it_and_takes_the_scores_gradient(monkeypatch):
    calls = []

    def chain(x, w1, w2, w3, rows, counts, top_k, top_scores, gemms):
        calls.append(tuple(top_scores.shape))
        assert top_scores.requires_grad
        return combined_torch_chain(x, w1, w2, w3, rows, counts, top_scores, top_k)

    def fails(*args, **kwargs):
        raise TypeError(FINGERPRINT_ERROR)

    monkeypatch.setattr(quack_experts, "gathered_swiglu_experts", fails)  # the chain without the combine is not run
    monkeypatch.setattr(quack_experts, "scored_gathered_swiglu_experts", chain)
    assert quack_experts.probe(torch.device("cpu"), 64, 32, torch.float32, scored=True) == ""
    assert calls == [(4, 2)]
    monkeypatch.setattr(quack_experts, "scored_gathered_swiglu_experts", fails)
    assert quack_experts.probe(torch.device("cpu"), 64, 32, torch.float32, scored=True) == "TypeError: " + \
        FINGERPRINT_ERROR


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient times `factor`: a chain whose output is right and one gradient wrong."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


@pytest.mark.parametrize("wrong,named", [
    (lambda x, w1, w2, w3: (x, w3, w2, w1), "output"),  # gate and up swapped
    (lambda x, w1, w2, w3: (x, w1, _ScaledGradient.apply(w2, 1.5), w3), "w2"),  # the down weight's gradient
    (lambda x, w1, w2, w3: (_ScaledGradient.apply(x, -1.0), w1, w2, w3), "x"),
])
def test_probe_refuses_a_chain_that_disagrees_with_float32(monkeypatch, wrong, named):
    """A chain that runs but computes something else (its output, or one gradient) is refused, naming what is
    off; the right chain passes (test above)."""
    from qwen_moe_ft.tools.expert_kernels import torch_chain

    def chain(x, w1, w2, w3, rows, counts, top_k, gemms):
        return torch_chain(*wrong(x, w1, w2, w3), rows, counts, top_k)

    monkeypatch.setattr(quack_experts, "gathered_swiglu_experts", chain)
    why = quack_experts.probe(torch.device("cpu"), 64, 32, torch.float32)
    assert why.startswith("ArithmeticError: quack's expert chain is off by") and why.endswith("bf16 allows"), why
    assert f"largest value in {named}," in why


def test_probe_of_the_chain_with_the_combine_refuses_wrong_scores(monkeypatch):
    """The combine inside the chain: scores not applied to the output, or their gradient wrong."""
    def unweighted(x, w1, w2, w3, rows, counts, top_k, top_scores, gemms):
        return combined_torch_chain(x, w1, w2, w3, rows, counts, torch.ones_like(top_scores), top_k) * top_scores.sum()

    def scores_gradient_doubled(x, w1, w2, w3, rows, counts, top_k, top_scores, gemms):
        return combined_torch_chain(x, w1, w2, w3, rows, counts, _ScaledGradient.apply(top_scores, 2.0), top_k)

    for chain, named in ((unweighted, "output"), (scores_gradient_doubled, "scores")):
        monkeypatch.setattr(quack_experts, "scored_gathered_swiglu_experts", chain)
        why = quack_experts.probe(torch.device("cpu"), 64, 32, torch.float32, scored=True)
        assert why.startswith("ArithmeticError") and f"largest value in {named}," in why, why


@needs_quack
def test_probe_passes_on_this_install():
    """The start-up check at Qwen3-30B-A3B's expert widths: what `--expert-kernels auto` runs before choosing quack
    (fails on an install quack cannot build kernels on, e.g. nvidia-cutlass-dsl outside site-packages)."""
    assert quack_experts.probe(torch.device("cuda"), 2048, 768, torch.bfloat16) == ""
    assert quack_experts.probe(torch.device("cuda"), 2048, 768, torch.bfloat16, scored=True) == ""


def test_split_gate_up_reference_separates_interleaved_columns():
    interleaved = torch.tensor([[1, 10, 2, 20, 3, 30], [4, 40, 5, 50, 6, 60]])
    assert quack_experts.split_gate_up_reference(interleaved).tolist() == [[1, 2, 3, 10, 20, 30], [4, 5, 6, 40, 50, 60]]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,inter", [(65536, 768), (37, 96), (5, 200), (0, 768)])
def test_split_gate_up_kernel_copies_exactly_what_torch_does(rows, inter):
    """A copy: bit for bit, at the real shape, at row and pair counts that leave partial blocks, and with no rows."""
    interleaved = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(quack_experts.split_gate_up(interleaved), quack_experts.split_gate_up_reference(interleaved))


def _run(fn, leaves, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def test_gemm_options_leave_unpinned_gemms_to_quack():
    device = torch.device("cpu")  # roles without a pinned config never ask which GPU this is
    assert quack_experts.GemmOptions().kwargs("gate_up", device) == dict(tuned=False)
    assert quack_experts.GemmOptions(pinned=False).kwargs("down", device) == dict(tuned=False)
    assert quack_experts.GemmOptions(tuned=True, dynamic_scheduler=True).kwargs("down", device) == dict(
        tuned=True, dynamic_scheduler=True)


def test_on_hopper_the_gate_up_gemm_takes_the_dynamic_scheduler_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr(quack_experts, "_is_hopper", lambda index: True)
    gpu = torch.device("cuda", 0)  # a device object only: no role here has a pinned config to build
    assert quack_experts.GemmOptions().kwargs("gate_up", gpu) == dict(tuned=False, dynamic_scheduler=True)
    assert quack_experts.GemmOptions(dynamic_scheduler=False).kwargs("gate_up", gpu) == dict(
        tuned=False, dynamic_scheduler=False)
    assert quack_experts.GemmOptions(pinned=False).kwargs("gate_up", gpu) == dict(tuned=False)
    assert quack_experts.GemmOptions(tuned=True).kwargs("gate_up", gpu) == dict(tuned=True)
    monkeypatch.setattr(quack_experts, "_is_hopper", lambda index: False)
    assert quack_experts.GemmOptions().kwargs("gate_up", gpu) == dict(tuned=False)


@pytest.mark.gpu
@needs_quack
def test_the_dynamic_scheduler_changes_no_bit_of_the_forward():
    """HOPPER_DYNAMIC hands the gate/up GEMM's tiles out at run time: each tile is the same sum in the same order,
    so the pre-activations and the expert rows equal the static order's bit for bit (the real widths, uneven
    experts, one without rows)."""
    experts, hidden, inter, tokens, top_k = 128, 2048, 768, 2048, 8
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    logits[:, -1] = float("-inf")
    selected = logits.topk(top_k, dim=-1).indices
    rows = torch.argsort(selected.view(-1), stable=True)
    counts = torch.bincount(selected.view(-1), minlength=experts)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
    w1, w3 = (torch.randn(experts, inter, hidden, device="cuda", generator=g).bfloat16() for _ in range(2))
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=g).bfloat16()
    w13, token_of_row, _, cu_seqlens, _ = quack_experts._chain_inputs(w1, w3, None, rows, counts, top_k)
    options = quack_experts.GemmOptions()
    if torch.cuda.get_device_capability()[0] == 9:
        assert options.kwargs("gate_up", x.device)["dynamic_scheduler"]
    dynamic = quack_experts._experts_forward(x, w13, w2, token_of_row, cu_seqlens, options)
    static = quack_experts._experts_forward(x, w13, w2, token_of_row, cu_seqlens,
                                            quack_experts.GemmOptions(dynamic_scheduler=False))
    assert all(torch.equal(a, b) for a, b in zip(dynamic, static))


@pytest.mark.gpu
@needs_quack
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("experts,hidden,inter,tokens,top_k", [(8, 256, 128, 512, 2), (128, 2048, 768, 1024, 8)])
def test_gathered_swiglu_experts_match_the_torch_path(experts, hidden, inter, tokens, top_k, pinned):
    """Against float32 on the torch path: bf16 products and sums in another order, so quack's error must stay
    within twice the bf16 torch path's own (~4e-3 of the largest value) plus a bf16 ulp; with the tile configs
    pinned on Hopper and with quack's own."""
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

    gemms = quack_experts.GemmOptions(pinned=pinned)
    if pinned and torch.cuda.get_device_capability()[0] == 9:
        assert "config" in gemms.kwargs("down", x.device)

    def quack_path(*t):
        return quack_experts.gathered_swiglu_experts(*t, rows, counts, top_k, gemms=gemms)

    exact = _run(torch_path, leaves, grad_out)
    bf16 = _run(torch_path, [t.bfloat16() for t in leaves], grad_out)
    ours = _run(quack_path, [t.bfloat16() for t in leaves], grad_out)
    for name, want, theirs, got in zip(("out", "x", "w1", "w2", "w3"), exact, bf16, ours):
        assert got.shape == want.shape and got.is_contiguous(), name
        assert max_rel_err(got, want) <= 2 * max_rel_err(theirs, want) + 4e-3, name
    assert all((grad[-1] == 0).all() for grad in ours[2:]), "the unchosen expert's weight gradients"


@pytest.mark.gpu
@needs_quack
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("experts,hidden,inter,tokens,top_k", [(8, 256, 128, 512, 2), (128, 2048, 768, 1024, 8)])
def test_the_chain_with_the_combine_matches_the_torch_path_and_autoeps_combine(experts, hidden, inter, tokens, top_k,
                                                                             pinned):
    """scored_gathered_swiglu_experts against the torch chain weighted and summed as AutoEP's combine does, in
    float32: the token outputs and the gradients of the tokens, the three weights and the scores. Its backward
    applies the scores in float32 inside SwiGLU's backward where the torch path rounds the weighted gradient rows to
    bf16 first, so the same bound as the chain without the combine holds: twice the bf16 torch path's error plus a
    bf16 ulp."""
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(tokens, experts, device="cuda", generator=g)
    logits[:, -1] = float("-inf")  # an expert without rows: its weight gradients must be zeros, not left unwritten
    top = logits.softmax(-1).topk(top_k, dim=-1)
    selected, scores = top.indices, top.values
    rows = torch.argsort(selected.view(-1), stable=True)
    counts = torch.bincount(selected.view(-1), minlength=experts)
    x = torch.randn(tokens, hidden, device="cuda", generator=g)
    w1, w3 = (torch.randn(experts, inter, hidden, device="cuda", generator=g) * hidden ** -0.5 for _ in range(2))
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=g) * inter ** -0.5
    grad_out = torch.randn(tokens, hidden, device="cuda", generator=g)
    gemms = quack_experts.GemmOptions(pinned=pinned)

    def torch_path(x, w1, w2, w3, scores):
        return combined_torch_chain(x, w1, w2, w3, rows, counts, scores, top_k)

    def quack_path(x, w1, w2, w3, scores):
        return quack_experts.scored_gathered_swiglu_experts(x, w1, w2, w3, rows, counts, top_k, scores, gemms=gemms)

    exact = _run(torch_path, [x, w1, w2, w3, scores], grad_out)
    bf16 = _run(torch_path, [t.bfloat16() for t in (x, w1, w2, w3)] + [scores], grad_out)
    ours = _run(quack_path, [t.bfloat16() for t in (x, w1, w2, w3)] + [scores], grad_out)
    for name, want, theirs, got in zip(("out", "x", "w1", "w2", "w3", "scores"), exact, bf16, ours):
        assert got.shape == want.shape and got.is_contiguous(), name
        assert max_rel_err(got, want) <= 2 * max_rel_err(theirs, want) + 4e-3, name
    assert all((grad[-1] == 0).all() for grad in ours[2:5]), "the unchosen expert's weight gradients"

