"""Expert LoRA without merged weights, against the merged-weight formula W + (alpha / r) B A on the tiny model's
AutoEP experts (CPU fp32; on a GPU, where AutoEP's activation is a Triton kernel and torch._grouped_mm takes
bf16, in bf16 against the formula in fp32); the adapter saved at EP=2 by two gloo processes, against EP=1."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.config import LoraConfig, TrainConfig
from qwen_moe_ft.model.lora import ExpertLoRA, adapter_state_dict, apply_lora, save_adapter
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
    cfg = TrainConfig.from_flat(lora=True, lora_targets="experts", lora_rank=rank, lora_alpha=16.0, dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    model = apply_lora(model, cfg.lora, build_ds_config(ep_size=1, world_size=1, device_type="cpu", dtype="fp32"),
                       rank=0, seed=cfg.optim.seed)
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


def test_cpu_tensors_take_the_torch_swiglu_where_deepspeed_would_take_triton(process_group, monkeypatch):
    """DeepSpeed takes its Triton SwiGLU wherever a GPU exists; the experts choose by their tensors' device, so CPU
    tensors on a GPU machine (here: DeepSpeed told it has one) run, to the merged weights' output."""
    from deepspeed.ops.triton_ops import swiglu_triton

    monkeypatch.setattr(swiglu_triton, "_TRITON_AVAILABLE", True)
    experts = expert_lora(4).to("cpu", torch.float32)
    base, counts = experts.base, torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), base.w1.shape[2])
    reference = merged_reference(x, COUNTS, base.w1, base.w3, base.w2, *experts.lora_parameters(), experts.scaling)
    out = experts(x, counts)
    out.backward(torch.randn_like(out))  # through the activation's backward too
    assert max_rel_err(out, reference) < 1e-5


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


# The experts fed the tokens and the routed rows' order (what one_rank_dispatch passes; lora_expert_mlp.py) against
# the same module fed the gathered rows, and what their backward keeps.
TOP_K = 2


def routing(seed: int = 0):
    """COUNTS' rows as TOP_K slots of sum(COUNTS) / TOP_K tokens, in a random expert order: `rows` is the permutation
    of the (token, slot) pairs, as local_dispatch.expert_order returns it."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(sum(COUNTS) - sum(COUNTS) % TOP_K, generator=g)
    return rows.to(DEVICE), torch.tensor(COUNTS[:-1] + [COUNTS[-1] - sum(COUNTS) % TOP_K], device=DEVICE)


@pytest.mark.parametrize("rank", [8, 3])
def test_token_rows_give_the_gathered_rows_output_and_gradients(process_group, rank):
    experts = expert_lora(rank)
    rows, counts = routing()
    tokens = torch.randn(rows.numel() // TOP_K, experts.base.w1.shape[2], device=DEVICE, dtype=DTYPE)
    grad_out = torch.randn(rows.numel(), tokens.shape[1], device=DEVICE, dtype=DTYPE)

    def run(from_tokens: bool):
        x = tokens.clone().requires_grad_(True)
        out = experts(x, counts, rows, TOP_K) if from_tokens else experts(x[rows // TOP_K], counts)
        return [out, *torch.autograd.grad(out, [x, *experts.lora_parameters()], grad_out)]

    # the same GEMMs on the same rows; the tokens' gradient sums a token's TOP_K rows in another order (fp32: ~1e-7)
    for name, got, want in zip(["out", "tokens", "A_gate_up", "B_gate_up", "A_down", "B_down"], run(True), run(False)):
        assert max_rel_err(got, want) < TOLERANCE, name


def test_backward_keeps_gate_up_and_rank_r_products_only(process_group):
    """Saved for the backward, besides the tokens and the weights: gate and up (rows x 2I), the rank-r products
    (rows x r, twice), the rows' order and the offsets. The routed input rows (rows x H) and the activation's output
    (rows x I) are rebuilt in the backward."""
    experts = expert_lora(8)
    rows, counts = routing()
    tokens = torch.randn(rows.numel() // TOP_K, experts.base.w1.shape[2], device=DEVICE, dtype=DTYPE,
                         requires_grad=True)
    known = {t.untyped_storage().data_ptr() for t in [tokens, *experts.parameters()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = experts(tokens, counts, rows, TOP_K)
    new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
           if t.untyped_storage().data_ptr() not in known}
    n, inter, size = rows.numel(), experts.base.w1.shape[1], tokens.element_size()
    expected = 2 * n * inter * size + 2 * n * 8 * size + rows.numel() * rows.element_size() + counts.numel() * 4
    assert sum(new.values()) == expected
    out.sum().backward()  # the backward runs from what was kept
    assert tokens.grad is not None and all(p.grad is not None for p in experts.lora_parameters())


LORA = LoraConfig(enabled=True, rank=4)  # attention and experts
SEED = 42


def lora_model(ep_size: int, rank: int):
    """The tiny model with LoRA at `ep_size`, each expert's B factors filled with its global index + 1 (B starts at
    zero), so that a saved adapter shows which expert landed where."""
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    ds_config = build_ds_config(ep_size=ep_size, world_size=ep_size, device_type="cpu", dtype="fp32")
    model = apply_lora(model, LORA, ds_config, rank=rank, seed=SEED)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in modules.items():
            if isinstance(module, ExpertLoRA):
                moe = modules[name[:-len(".experts")]]
                for i in range(moe.num_local_experts):
                    for b in (module.lora_B_gate_up, module.lora_B_down):
                        b[i] = moe.ep_rank * moe.num_local_experts + i + 1
    return model


class LargestTensor(TorchDispatchMode):
    """The largest tensor any operation returns while it is active, in bytes."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def _save_adapter_at_ep2(rank: int, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed
    import torch.distributed as dist
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    deepspeed.init_distributed("gloo")
    model = lora_model(ep_size=2, rank=rank)
    for module in model.modules():
        if isinstance(module, AutoEPMoELayer):
            module.set_deepspeed_parallelism()  # the EP group, as the engine binds it
    largest = LargestTensor()
    with largest:
        save_adapter(model, LORA, str(TINY), out, is_main=rank == 0)
    own = max(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    (Path(out).parent / f"rank{rank}.json").write_text(json.dumps({"largest": largest.bytes, "own": own}))
    dist.destroy_process_group()


def test_the_adapter_saved_at_ep2_is_ep1s_and_only_the_writing_rank_holds_it(process_group, tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # CPU processes, also on a machine with a GPU (hidden from them): DeepSpeed would otherwise bind each rank's
    # process group to cuda:LOCAL_RANK, which a machine of one GPU lacks for rank 1
    with monkeypatch.context() as env:
        env.setenv("DS_ACCELERATOR", "cpu")
        env.setenv("CUDA_VISIBLE_DEVICES", "")
        mp.spawn(_save_adapter_at_ep2, args=(str(tmp_path / "adapter"), port), nprocs=2)
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = adapter_state_dict(lora_model(ep_size=1, rank=0))
    assert sorted(written) == sorted(expected)
    assert any("experts.base_layer.lora_B" in k for k in written) and any("q_proj.lora_A" in k for k in written)
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    other = json.loads((tmp_path / "rank1.json").read_text())
    # it takes part in the gathers with its own factors, and builds nothing larger
    assert other["largest"] <= other["own"], other


def test_attention_lora_computes_what_pefts_lora_linear_computes():
    """LinearLoRA against PEFT's LoRA wrapper of the same nn.Linear with the same factors: output, every gradient
    (fp32: the same products, PEFT's scaling applied after B's GEMM rather than inside addmm: ~1e-7 of the
    values), and the merged weight."""
    import peft

    from qwen_moe_ft.model.lora import LinearLoRA

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False)
    ours = LinearLoRA(base, rank=4, alpha=8.0)
    with torch.no_grad():
        ours.lora_B.weight.normal_()  # B starts at zero; any B here
    theirs = peft.get_peft_model(torch.nn.Sequential(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    wrapper = theirs.base_model.model[0]
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(ours.lora_A.weight)
        wrapper.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 64, requires_grad=True)
    out_ours, out_theirs = ours(x), wrapper(x)
    grad_out = torch.randn_like(out_ours)
    g_ours = torch.autograd.grad(out_ours, (x, ours.lora_A.weight, ours.lora_B.weight), grad_out)
    g_theirs = torch.autograd.grad(out_theirs, (x, wrapper.lora_A["default"].weight,
                                                wrapper.lora_B["default"].weight), grad_out)
    assert out_ours.shape == out_theirs.shape and max_rel_err(out_ours, out_theirs) < 1e-6
    for a, b in zip(g_ours, g_theirs):
        assert max_rel_err(a, b) < 1e-6
    reference = base.weight + 2.0 * ours.lora_B.weight @ ours.lora_A.weight
    assert max_rel_err(ours.merged().weight, reference) < 1e-6


def test_lora_checkpoints_of_pefts_wrappers_map_to_todays_names():
    """Checkpoints written while PEFT wrapped the attention projections name every factor as PEFT's model does;
    checkpoint/lora_state._legacy_lora_name maps today's names onto exactly those."""
    import peft

    from qwen_moe_ft.checkpoint.lora_state import _legacy_lora_name
    from qwen_moe_ft.model.lora import ATTENTION_MODULES

    ours = lora_model(ep_size=1, rank=0)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    ds_config = build_ds_config(ep_size=1, world_size=1, device_type="cpu", dtype="fp32")
    old = apply_lora(model, LoraConfig(enabled=True, rank=4, targets="experts"), ds_config, rank=0, seed=SEED)
    old = peft.get_peft_model(old, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_MODULES))
    for module in old.modules():  # as apply_lora did: PEFT froze all but its own
        if isinstance(module, ExpertLoRA):
            for param in module.lora_parameters():
                param.requires_grad_(True)
    legacy = [name for name, p in old.named_parameters() if p.requires_grad]
    assert [_legacy_lora_name(name) for name, p in ours.named_parameters() if p.requires_grad] == legacy
