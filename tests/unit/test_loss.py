import pytest
import torch
import torch.nn.functional as F

from helpers import max_rel_err
from qwen_moe_ft.data.rows import IGNORE
from qwen_moe_ft.loss import (PLAIN_LOSS_MAX_TOKENS, _cce_sum, _fused_linear_ce_sum, backward_scale,
                              chunked_linear_ce_sum, select_loss_impl, whole_logits_loss)


def test_backward_scale_turns_deepspeed_sums_into_a_global_token_mean():
    # DeepSpeed sums gradients over ranks (gradient_allreduce_op "sum") and divides by the accumulation
    # steps; the step's gradient must be that of (sum of token losses) / (label tokens of the global batch).
    world, accum, tokens = 4, 3, 1200
    per_micro_sums = torch.rand(world, accum) * 100
    deepspeed_objective = (per_micro_sums * backward_scale(tokens, accum)).sum() / accum
    torch.testing.assert_close(deepspeed_objective, per_micro_sums.sum() / tokens)


def test_loss_impl_selection():
    assert select_loss_impl("auto", "cpu", tokens=4096) == ("torch", "")
    assert select_loss_impl("torch", "cuda", tokens=32768) == ("torch", "")
    assert select_loss_impl("chunked", "cpu") == ("chunked", "")
    with pytest.raises(ValueError, match="--loss-impl liger"):
        select_loss_impl("liger", "cpu")
    with pytest.raises(ValueError, match="--loss-impl triton needs a GPU and triton; use --loss-impl torch"):
        select_loss_impl("triton", "cpu")


def test_the_whole_logits_loss_is_triton_where_it_runs(monkeypatch):
    import importlib.util

    assert whole_logits_loss("cpu") == "torch"
    find_spec = importlib.util.find_spec
    for spec, loss in ((None, "torch"), (object(), "triton")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "triton" else find_spec(name, *a))
        assert whole_logits_loss("cuda") == loss


def test_auto_computes_the_loss_in_chunks_for_long_micro_batches_or_where_the_logits_do_not_fit():
    assert select_loss_impl("auto", "cuda", tokens=PLAIN_LOSS_MAX_TOKENS)[0] == whole_logits_loss("cuda")
    impl, why = select_loss_impl("auto", "cuda", tokens=32768)
    assert impl == "chunked" and why == f"auto: 32768 tokens a micro-batch, more than {PLAIN_LOSS_MAX_TOKENS}"
    impl, why = select_loss_impl("auto", "cuda", tokens=4096, logits_fit=False)
    assert impl == "chunked" and "exceeds the GPU" in why


@pytest.mark.gpu
@pytest.mark.parametrize("impl, package", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_fused_linear_cross_entropy_matches_logits_path_in_bf16(impl, package):
    pytest.importorskip(package)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, vocab = 4096, 2048, 151936
    h = (torch.randn(tokens, hidden, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    labels[::7] = IGNORE
    fused = (_cce_sum if impl == "cce" else _fused_linear_ce_sum)(h, w, labels)
    dh_fused, dw_fused = torch.autograd.grad(fused * 0.001, (h, w))
    reference = F.cross_entropy((h @ w.T).float(), labels, ignore_index=IGNORE, reduction="sum")
    dh_ref, dw_ref = torch.autograd.grad(reference * 0.001, (h, w))
    print(f"{impl} vs torch: loss rel {abs(fused.item() - reference.item()) / reference.item():.2e}, "
          f"dh {max_rel_err(dh_fused, dh_ref):.2e}, dw {max_rel_err(dw_fused, dw_ref):.2e}")
    assert abs(fused.item() - reference.item()) / reference.item() < 1e-3
    assert max_rel_err(dh_fused, dh_ref) < 2e-2 and max_rel_err(dw_fused, dw_ref) < 2e-2


def _problem(dtype=torch.float32, tokens=300, hidden=32, vocab=1000, seed=0):
    """Hidden states and LM head weight of the magnitudes of a model's last layer (logits of a few units), labels
    with every seventh token ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::7] = IGNORE
    return h, w, labels


def _plain(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 64, 77, 300, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_path_in_float32(chunk):
    # 300 tokens: chunks of 77 leave 69 at the end; 300 and 4096 are one chunk. fp32's unit roundoff is 6e-8; the loss
    # sums 258 token losses and each gradient element sums up to 1000 products (vocab) or 300 (tokens), computed in
    # another order (exp(x - max) / sum against exp(log_softmax)), so rounding moves them by ~sqrt(n) x 6e-8, up to
    # 2e-6 of the largest element (measured 7e-7); a lost chunk, an ignored token counted or a scale applied twice
    # moves them by O(1) of it.
    h, w, labels = _problem()
    plain = _plain(h, w, labels)
    dh, dw = torch.autograd.grad(plain * 0.01, (h, w))  # the trainer scales the sum by 1 / label tokens
    chunked = chunked_linear_ce_sum(h, w, labels, chunk)
    dh_chunked, dw_chunked = torch.autograd.grad(chunked * 0.01, (h, w))
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - plain.item()) <= 1e-6 * plain.item()
    assert max_rel_err(dh_chunked, dh) < 1e-5 and max_rel_err(dw_chunked, dw) < 1e-5
    assert (dh_chunked[::7] == 0).all()  # ignored tokens get no gradient
    with torch.no_grad():  # evaluation: the loss alone, the same
        assert chunked_linear_ce_sum(h, w, labels, chunk).item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_gradients_in_bf16_are_as_close_to_exact_as_the_plain_path(seed):
    # bf16 rounds to 2^-8 relative: the plain path rounds the scaled logits' gradient and the products once each,
    # the chunked one also rounds the products before the fp32 scale (and each chunk's weight gradient before their
    # fp32 sum). Against float64 of the same bf16 inputs both stay within a few roundings of the largest element
    # (measured 0.5-0.8% plain, 0.7-1.0% chunked); 2^-6 bounds both.
    h, w, labels = _problem(torch.bfloat16, seed=seed)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    exact = torch.autograd.grad(_plain(h64, w64, labels) * 0.01, (h64, w64))
    plain = torch.autograd.grad(_plain(h, w, labels) * 0.01, (h, w))
    chunked = torch.autograd.grad(chunked_linear_ce_sum(h, w, labels, 77) * 0.01, (h, w))
    for grad_plain, grad_chunked, grad_exact in zip(plain, chunked, exact):
        assert grad_chunked.dtype == torch.bfloat16
        assert max_rel_err(grad_plain, grad_exact) < 2**-6 and max_rel_err(grad_chunked, grad_exact) < 2**-6


def _saved_sizes(loss_of, h, w, labels) -> list[int]:
    """Element counts of the tensors autograd keeps for the backward of `loss_of(h, w, labels)`."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(h, w, labels).backward()
    return sizes


@pytest.mark.parametrize("lm_head_trains", [True, False])
def test_chunked_loss_keeps_nothing_of_tokens_x_vocab_for_the_backward(lm_head_trains):
    tokens, hidden, vocab = 300, 32, 1000
    h, w, labels = _problem(tokens=tokens, hidden=hidden, vocab=vocab)
    w.requires_grad_(lm_head_trains)  # LoRA: the LM head is frozen, no weight gradient is built
    assert max(_saved_sizes(_plain, h, w, labels)) >= tokens * vocab  # what the check would catch
    saved = _saved_sizes(lambda *a: chunked_linear_ce_sum(*a, 64), h, w, labels)
    # the gradients w.r.t. hidden [tokens, hidden] and, where it trains, w.r.t. the weight [vocab, hidden]
    assert sorted(saved) == sorted([tokens * hidden] + ([vocab * hidden] if lm_head_trains else []))
