"""The Triton cross-entropy on bf16 logits (GPU) against the plain path, F.cross_entropy on their fp32 copy: the same
loss and, through the LM head, the same gradients; without a GPU the function is the plain path itself."""
import pytest
import torch
import torch.nn.functional as F

from helpers import max_rel_err
from qwen_moe_ft.data.rows import IGNORE
from qwen_moe_ft.logits_cross_entropy import logits_cross_entropy_sum, runs_here


def _problem(device, tokens, hidden, vocab, seed=0):
    """Hidden states and an LM head giving logits of a few units, every seventh label ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = (torch.randn(tokens, hidden, device=device, generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=g) * 0.1).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    labels[::7] = IGNORE
    return h, w, labels


def test_without_triton_it_is_the_plain_path():
    h, w, labels = _problem("cpu", 64, 16, 300)
    assert not runs_here(h)
    got = logits_cross_entropy_sum(F.linear(h, w), labels, IGNORE)
    assert got.dtype == torch.float32
    assert got.item() == F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE, reduction="sum").item()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, vocab", [(4096, 151936), (37, 1000), (5, 8193)])  # Qwen3's; below and over a block
def test_loss_and_gradients_equal_the_plain_path(tokens, vocab):
    # Both take fp32 from the same bf16 logits: the loss differs by the order of the sums (fp32, ~1e-6 of it); each
    # gradient is rounded to bf16 once in both (2^-9 relative), then summed by the LM head's GEMMs in fp32.
    h, w, labels = _problem("cuda", tokens, 2048 if vocab > 100000 else 64, vocab)
    scale = 1 / 1000  # the trainer's 1 / label tokens

    def grads(loss_of):
        loss = loss_of(F.linear(h, w))
        return (loss, *torch.autograd.grad(loss * scale, (h, w)))

    ours = grads(lambda logits: logits_cross_entropy_sum(logits, labels, IGNORE))
    plain = grads(lambda logits: F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum"))
    assert ours[0].dtype == torch.float32
    assert abs(ours[0].item() - plain[0].item()) <= 1e-5 * plain[0].item()
    assert max_rel_err(ours[1], plain[1]) < 2**-7 and max_rel_err(ours[2], plain[2]) < 2**-7
    assert (ours[1][::7] == 0).all()  # ignored tokens get no gradient


@pytest.mark.gpu
def test_the_gradient_is_written_over_the_logits_and_evaluation_leaves_them():
    h, w, labels = _problem("cuda", 64, 64, 5000)
    logits = F.linear(h, w)
    with torch.no_grad():
        before = logits.clone()
        logits_cross_entropy_sum(logits, labels, IGNORE)
    assert torch.equal(logits, before)
    loss = logits_cross_entropy_sum(logits, labels, IGNORE)
    loss.backward()
    expected = torch.softmax(before.float(), dim=1) - F.one_hot(labels.clamp(min=0), 5000)
    expected[labels == IGNORE] = 0
    assert max_rel_err(logits, expected) < 2**-7
