"""The leaner ZeRO-2 step on DeepSpeed's real optimizer (one CPU rank, gloo): the same clipping norm as
DeepSpeed's fp64 norm (also where the backward took part of it), a non-finite gradient still skips the
step, clipping inside torch's fused AdamW updates the weights as DeepSpeed's separate clip pass does, the
one-pass MasterAdamW step updates master and bf16 weights as DeepSpeed's own step does, and the gate/up
concatenations it keeps train exactly as concatenating in every forward."""
import deepspeed
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY
from qwen_moe_ft.config import TrainConfig
from qwen_moe_ft.parallel import build_ds_config
from qwen_moe_ft.adamw import MasterAdamW
from qwen_moe_ft.expert_mlp import use_layout_preserving_gate_up
from qwen_moe_ft.zero_step import (fold_clip_into_adam, fuse_adam_step, keep_unreduced_grads_in_place, lean_grad_checks,
                                   mirror_gate_up_weights)


def _engine(dtype=torch.bfloat16, fold_clip=True, fused_states=None, zero_stage=2, reduce_bucket_size=None):
    """`fused_states`: the moments' dtype of the one-pass step (fuse_adam_step), None for DeepSpeed's step."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=dtype)
    cfg = TrainConfig(lr=1e-3, grad_clip=1.0, weight_decay=0.1, dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                      zero_stage=zero_stage)
    ds_config = build_ds_config(cfg, ep_size=1, world_size=1, device_type="cpu")
    if reduce_bucket_size:
        ds_config["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_size
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    assert lean_grad_checks(engine.optimizer)
    if fused_states is not None:
        assert fuse_adam_step(engine.optimizer, fused_states)
    elif fold_clip:
        assert fold_clip_into_adam(engine.optimizer)
    return engine


def _backward(engine, poison: str | None = None):
    """One micro-batch (a gradient accumulation boundary); `poison` names a parameter whose gradient is NaN."""
    params = dict(engine.module.named_parameters())
    hook = params[poison].register_hook(lambda g: torch.full_like(g, float("nan"))) if poison else None
    ids = torch.randint(0, 2048, (1, 96), generator=torch.Generator().manual_seed(1)).to(engine.device)
    engine.backward(engine(input_ids=ids, labels=ids).loss * 100)  # scaled so the clip is active
    if hook:
        hook.remove()


def test_norm_matches_deepspeeds_fp64_norm(process_group):
    engine = _engine()
    _backward(engine)
    optimizer = engine.optimizer
    ours = optimizer.scaled_global_norm()
    del optimizer.scaled_global_norm, optimizer.get_grad_norm_direct  # back to DeepSpeed's own methods
    reference = optimizer.scaled_global_norm()
    assert reference.item() > 1.0
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("fused_states", [None, torch.bfloat16])
@pytest.mark.parametrize("poison", ["model.layers.0.mlp.experts.w1", "model.layers.1.self_attn.q_proj.weight"])
def test_nan_gradient_skips_the_step_and_the_next_one_applies(process_group, poison, fused_states):
    engine = _engine(fused_states=fused_states)
    weights = lambda: {n: p.detach().clone() for n, p in engine.module.named_parameters()}  # noqa: E731
    before = weights()
    _backward(engine, poison=poison)
    engine.step()
    assert engine.skipped_steps == 1
    assert all(torch.equal(before[n], w) for n, w in weights().items())

    _backward(engine)
    engine.step()
    assert engine.skipped_steps == 1
    after = weights()
    assert all(torch.isfinite(w).all() for w in after.values())
    assert not torch.equal(before[poison], after[poison])


def test_clip_inside_adam_updates_the_weights_as_deepspeeds_clip_pass(process_group):
    runs = {}
    for fold in (True, False):
        engine = _engine(torch.float32, fold_clip=fold)
        for _ in range(3):
            _backward(engine)
            engine.step()
            assert engine.get_global_grad_norm() > 1.0  # the clip is active every step
        runs[fold] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for name, weight in runs[True].items():
        assert torch.allclose(weight, runs[False][name], rtol=0, atol=1e-6), name


def _train(engine, steps=3):
    for _ in range(steps):
        _backward(engine)
        engine.step()
        assert engine.get_global_grad_norm() > 1.0  # the clip is active every step
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return weights, [g.detach().clone() for g in engine.optimizer.single_partition_of_fp32_groups]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_one_pass_step_updates_master_and_bf16_weights_as_deepspeeds_step(process_group, zero_stage):
    # On CUDA torch's fused AdamW and the Triton kernel differ in the last bit of some fp32 values, which
    # flips a few bf16 roundings, hence the next gradients (measured: equal masters to 7e-9 after one step,
    # 1e-4 apart after three): one step is the comparison there.
    steps = 1 if torch.cuda.is_available() else 3
    reference_weights, reference_master = _train(_engine(zero_stage=zero_stage), steps)
    engine = _engine(fused_states=torch.float32, zero_stage=zero_stage)
    assert isinstance(engine.optimizer.optimizer, MasterAdamW)
    weights, master = _train(engine, steps)
    for ours, theirs in zip(master, reference_master):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for name, weight in weights.items():
        assert weight.dtype == torch.bfloat16
        # bf16 copies of fp32 values that agree to 1e-6: equal but for rounding-boundary cases (one ulp)
        torch.testing.assert_close(weight, reference_weights[name], rtol=2**-7, atol=1e-6, msg=name)


def test_bf16_moments_follow_fp32_moments(process_group):
    reference_weights, reference_master = _train(_engine(fused_states=torch.float32), steps=4)
    engine = _engine(fused_states=torch.bfloat16)
    weights, master = _train(engine, steps=4)
    states = engine.optimizer.optimizer.state.values()
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    start = _engine().optimizer.single_partition_of_fp32_groups
    for ours, theirs, initial in zip(master, reference_master, start):
        moved = (theirs - initial).abs().mean()
        assert moved > 0
        assert (ours - theirs).abs().mean() < 0.02 * moved


def test_norms_taken_in_the_backward_give_deepspeeds_norm(process_group):
    """Gradients reduced where autograd wrote them (a reduce bucket smaller than each expert weight) have
    their norm taken in the backward; the step's norm uses those and still equals DeepSpeed's."""
    bucket = 8 * 64 * 64 - 1
    engine = _engine(reduce_bucket_size=bucket)
    optimizer = engine.optimizer
    assert keep_unreduced_grads_in_place(optimizer)
    _backward(engine)
    large = {id(p) for p in engine.module.parameters() if p.numel() > bucket}  # experts, embedding, LM head
    assert len(large) == 2 * 3 + 2 and set(optimizer.qmf_early_norms) == large
    ours = optimizer.scaled_global_norm()
    assert "qmf_early_norms" not in vars(optimizer)  # consumed: the next step takes its own
    del optimizer.scaled_global_norm, optimizer.get_grad_norm_direct
    assert ours.item() == pytest.approx(optimizer.scaled_global_norm().item(), rel=1e-5)


@pytest.mark.parametrize("fused_states", [None, torch.float32])
def test_gradients_left_in_place_train_as_their_copies(process_group, fused_states):
    """A reduce bucket smaller than each expert weight (as in ds_configs/zero2_ep.json at full size): on one
    rank the expert gradients skip the copy into the partition buffer; the weights still match."""
    bucket = 8 * 64 * 64 - 1  # one element short of an expert weight of the tiny model (8 experts, 64 x 64)
    reference_weights, _ = _train(_engine(fused_states=fused_states, reduce_bucket_size=bucket))
    engine = _engine(fused_states=fused_states, reduce_bucket_size=bucket)
    optimizer = engine.optimizer
    copied = []
    deepspeed_copy = optimizer.copy_grads_in_partition
    optimizer.copy_grads_in_partition = lambda param, group_idx=None: (copied.append(param.numel()),
                                                                       deepspeed_copy(param, group_idx))
    assert keep_unreduced_grads_in_place(optimizer)
    weights, _ = _train(engine)
    experts = [p for n, p in engine.module.named_parameters() if ".experts." in n]
    assert experts and all(p.numel() > bucket for p in experts)
    assert len(copied) == 3 * sum(1 for p in engine.module.parameters() if p.numel() <= bucket)
    for name, weight in weights.items():
        assert torch.equal(weight, reference_weights[name]), name


def test_gate_up_caches_kept_by_the_step_train_as_concatenating_in_each_forward(process_group):
    engines = {}
    for cached in (False, True):
        engines[cached] = _engine(fused_states=torch.float32)
        assert use_layout_preserving_gate_up(engines[cached].module) == 2
        if cached:
            assert mirror_gate_up_weights(engines[cached].optimizer, engines[cached].module) == 2
    reference, _ = _train(engines[False])
    weights, _ = _train(engines[True])
    for name, weight in weights.items():
        assert torch.equal(weight, reference[name]), name
    caches = engines[True].optimizer.qmf_gate_up_caches
    assert len(caches) == 2
    for cache, w1, w3 in caches:
        assert cache.builds == 1  # the first forward; every step since wrote it
        assert torch.equal(cache.weights, torch.cat([w1, w3], dim=1))

    _backward(engines[True], poison="model.layers.0.mlp.experts.w1")
    engines[True].step()  # skipped by DeepSpeed's own step: the caches are rebuilt, not trusted
    _backward(engines[True])
    assert [cache.builds for cache, _, _ in caches] == [2, 2]
