"""Packed documents through varlen attention compute exactly what each document computes alone."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.model.attention import (BACKENDS, attention_name, available_backends, register_varlen_attention,
                                        select_backend)
from qwen_moe_ft.data.rows import IGNORE
from qwen_moe_ft.loss import token_loss_sum
from qwen_moe_ft.data.packing import collate_packed


def _documents(vocab, lengths=(7, 19, 3, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3:]  # a prompt part without labels
        docs.append({"input_ids": ids, "labels": labels})
    return docs


def _model(attn):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, attn_implementation=attn)


@pytest.mark.parametrize("lengths", [(7, 19, 3, 12), (9, 9, 9)], ids=["mixed", "equal"])
def test_packed_logits_loss_and_gradients_equal_each_document_alone(lengths):
    """Equal lengths take the dense-batch path, mixed lengths the varlen kernel."""
    packed_model = _model(register_varlen_attention("sdpa"))
    alone_model = _model("sdpa")
    docs = _documents(packed_model.config.vocab_size, lengths)

    batch = collate_packed(docs)
    packed_logits = packed_model(**batch.inputs).logits[0]
    packed_loss = token_loss_sum(packed_model, batch.inputs, batch.shift_labels)
    packed_loss.backward()

    start, alone_loss = 0, 0.0
    for doc in docs:
        single = collate_packed([doc])
        ids = single.inputs["input_ids"]
        logits = alone_model(input_ids=ids).logits[0]
        n = ids.shape[1]
        torch.testing.assert_close(packed_logits[start:start + n], logits, atol=2e-5, rtol=1e-4)
        per_token = F.cross_entropy(logits, single.shift_labels[0], ignore_index=IGNORE, reduction="sum")
        alone_loss = alone_loss + per_token
        start += n
    alone_loss.backward()
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-6)
    for (name, a), (_, b) in zip(packed_model.named_parameters(), alone_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_varlen_attention_without_cu_seqlens_is_a_clear_error():
    model = _model(register_varlen_attention("sdpa"))
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_registered_names_are_not_taken_for_transformers_own_flash_attention():
    # transformers treats an implementation name containing "flash" as one of its kernels and tries to import it
    assert all("flash" not in attention_name(b) for b in BACKENDS)
    assert len({attention_name(b) for b in BACKENDS}) == len(BACKENDS)


def test_backend_selection():
    assert available_backends("cpu") == ["sdpa"]
    assert select_backend("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="--attn flash_attn"):
        select_backend("flash_attn", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_gpu_backend_matches_per_document_sdpa_in_bf16(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} not installed")
    from qwen_moe_ft.model.attention import _KERNELS

    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1000, 37, 2048, 511, 600]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    total, heads, kv, dim = sum(lengths), 32, 4, 128
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(total, kv, dim, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(total, kv, dim, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    grad_out = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    results = {}
    for name in (backend, "sdpa"):
        out = _KERNELS[name](q, k, v, cu, max(lengths), dim ** -0.5)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[name] = (out, *grads)
    for label, a, b in zip(("out", "dq", "dk", "dv"), results[backend], results["sdpa"]):
        err = max_rel_err(a, b)
        print(f"{backend} {label}: max abs err / max abs = {err:.2e}")
        assert err < 2e-2, (label, err)


@pytest.mark.gpu
def test_direct_flash_call_equals_torchs_varlen_attn():
    """_FlashVarlen calls the kernel varlen_attn runs: the same output to the bit. torch 2.11's varlen_attn has no
    GQA and is given K/V copied per query head, so its backward runs another kernel configuration and sums the copies'
    gradients in bf16: the gradients agree to bf16 rounding (2^-8 of the largest value)."""
    from qwen_moe_ft.model.attention import _FlashVarlen, _lean_flash_supported, _torch_varlen_attn

    if "torch_varlen" not in available_backends("cuda"):
        pytest.skip("torch's varlen attention is not available")
    if not _lean_flash_supported():
        pytest.skip(f"the direct call is not used with torch {torch.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1000, 37, 2048, 511, 600]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    total, heads, kv, dim = sum(lengths), 32, 4, 128
    q, k, v = (torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for h in (heads, kv, kv))
    grad_out = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    ours = [_FlashVarlen.apply(q, k, v, cu, max(lengths), dim ** -0.5)]
    ours += torch.autograd.grad(ours[0], (q, k, v), grad_out)
    ref = [_torch_varlen_attn(q, k, v, cu, max(lengths), dim ** -0.5)]
    ref += torch.autograd.grad(ref[0], (q, k, v), grad_out)
    assert torch.equal(ours[0], ref[0])
    for label, a, b in zip(("dq", "dk", "dv"), ours[1:], ref[1:]):
        assert max_rel_err(a, b) < 2**-7, label
