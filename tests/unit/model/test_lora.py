"""Expert LoRA without merged weights, against the merged-weight formula W + (alpha / r) B A on the tiny model's
AutoEP experts (CPU fp32; on a GPU, where AutoEP's activation is a Triton kernel and torch._grouped_mm takes
bf16, in bf16 against the formula in fp32)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.config import TrainConfig
from qwen_moe_ft.model.lora import ExpertLoRA, apply_lora
from qwen_moe_ft.parallel.ds_config import build_ds_config

COUNTS = [9, 0, 23, 4, 0, 17, 1, 11]  # rows per expert of the tiny model's 8, two experts without any
# fp32: sums of at most 64 products reassociated ((x A^T) B^T against x (B A)^T), errors ~1e-7 of the values;
# bf16 (8 significant bits): inputs and every product rounded, ~1e-2 of the values
DEVICE, DTYPE, TOLERANCE = ("cuda", torch.bfloat16, 2e-2) if torch.cuda.is_available() else ("cpu", torch.float32, 1e-5)


def merged_reference(x, counts, w1, w3, w2, a_gu, b_gu, a_d, b_d, scaling):
    """The expert MLP with each expert's LoRA update merged into its weights, one expert at a time."""
    inter, outs = w1.shape[1], []
    for e, rows in enumerate(x.split(counts)):
        gate_up = scaling * b_gu[e] @ a_gu[e]
        h = F.silu(rows @ (w1[e] + gate_up[:inter]).T) * (rows @ (w3[e] + gate_up[inter:]).T)
        outs.append(h @ (w2[e] + scaling * b_d[e] @ a_d[e]).T)
    return torch.cat(outs)


def expert_lora(rank: int) -> ExpertLoRA:
    """Layer 0's experts of the tiny model after AutoEP (EP=1) and apply_lora, with B drawn non-zero."""
    cfg = TrainConfig(lora=True, lora_targets="experts", lora_rank=rank, lora_alpha=16.0, dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    model = apply_lora(model, cfg, build_ds_config(cfg, ep_size=1, world_size=1, device_type="cpu"), rank=0)
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(0)
    with torch.no_grad():
        for b in (experts.lora_B_gate_up, experts.lora_B_down):
            b.normal_(std=0.05)  # the base weights' scale (std 0.02): the update matters in the output
    return experts.to(DEVICE, DTYPE)


@pytest.mark.parametrize("rank", [8, 3])  # 3: rows of 12 bytes, padded for torch._grouped_mm
def test_output_and_gradients_equal_the_merged_weights(process_group, rank):
    experts = expert_lora(rank)
    base = experts.base
    assert not any(p.requires_grad for p in base.parameters())
    counts = torch.tensor(COUNTS, device=DEVICE)
    x = torch.randn(sum(COUNTS), base.w1.shape[2], device=DEVICE, dtype=DTYPE)
    grad_out = torch.randn_like(x)

    def run(forward, factors, dtype):
        x_ = x.to(dtype).requires_grad_(True)
        out = forward(x_, factors)
        grads = torch.autograd.grad(out, [x_, *factors], grad_out.to(dtype))
        return out, grads

    out, grads = run(lambda x_, _: experts(x_, counts), experts.lora_parameters(), DTYPE)
    fp32 = [p.detach().float().requires_grad_(True) for p in experts.lora_parameters()]
    ref_out, ref_grads = run(lambda x_, f: merged_reference(x_, COUNTS, base.w1.float(), base.w3.float(),
                                                            base.w2.float(), *f, experts.scaling), fp32, torch.float32)
    assert max_rel_err(out, ref_out) < TOLERANCE
    for name, g, ref in zip(["x", "A_gate_up", "B_gate_up", "A_down", "B_down"], grads, ref_grads):
        assert max_rel_err(g, ref) < TOLERANCE, name
    for g in grads[1:]:
        assert g[[1, 4]].abs().max() == 0  # experts without rows get no update


def test_backward_keeps_nothing_of_a_base_weights_size(process_group):
    experts = expert_lora(8)
    counts = torch.tensor(COUNTS, device=DEVICE)
    x = torch.randn(sum(COUNTS), experts.base.w1.shape[2], device=DEVICE, dtype=DTYPE, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        experts(x, counts)
    new = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert new, "the hooks saw nothing"
    # the largest activation here ([65, 64]) is an eighth of one weight ([8, 64, 64])
    assert max(t.untyped_storage().nbytes() for t in new) < experts.base.w2.untyped_storage().nbytes() / 4
