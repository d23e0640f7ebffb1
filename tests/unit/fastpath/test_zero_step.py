"""The leaner ZeRO-2 step on DeepSpeed's real optimizer (one CPU rank, gloo): clipping inside torch's fused
AdamW updates the weights as DeepSpeed's separate clip pass does, the one-pass MasterAdamW step updates
master and bf16 weights as DeepSpeed's own step does, expert gradients left where autograd wrote them train
as their copies, and the gate/up concatenations the step keeps train exactly as concatenating in every
forward."""
import pytest
import torch

from helpers import zero_backward, zero_engine
from qwen_moe_ft.fastpath.adamw import MasterAdamW
from qwen_moe_ft.fastpath.expert_mlp import use_layout_preserving_gate_up
from qwen_moe_ft.fastpath.zero_step import keep_unreduced_grads_in_place, mirror_gate_up_weights


def test_clip_inside_adam_updates_the_weights_as_deepspeeds_clip_pass(process_group):
    runs = {}
    for fold in (True, False):
        engine, _ = zero_engine(torch.float32, fold_clip=fold)
        for _ in range(3):
            zero_backward(engine)
            engine.step()
            assert engine.get_global_grad_norm() > 1.0  # the clip is active every step
        runs[fold] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for name, weight in runs[True].items():
        assert torch.allclose(weight, runs[False][name], rtol=0, atol=1e-6), name


def _train(engine, steps=3, grad_accum=1):
    for _ in range(steps):
        for micro_batch in range(grad_accum):
            zero_backward(engine, seed=1 + micro_batch)
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
    reference_weights, reference_master = _train(zero_engine(zero_stage=zero_stage)[0], steps)
    engine, _ = zero_engine(fused_states=torch.float32, zero_stage=zero_stage)
    assert isinstance(engine.optimizer.optimizer, MasterAdamW)
    weights, master = _train(engine, steps)
    for ours, theirs in zip(master, reference_master):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for name, weight in weights.items():
        assert weight.dtype == torch.bfloat16
        # bf16 copies of fp32 values that agree to 1e-6: equal but for rounding-boundary cases (one ulp)
        torch.testing.assert_close(weight, reference_weights[name], rtol=2**-7, atol=1e-6, msg=name)


def test_bf16_moments_follow_fp32_moments(process_group):
    reference_weights, reference_master = _train(zero_engine(fused_states=torch.float32)[0], steps=4)
    engine, _ = zero_engine(fused_states=torch.bfloat16)
    weights, master = _train(engine, steps=4)
    states = engine.optimizer.optimizer.state.values()
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    start = zero_engine()[0].optimizer.single_partition_of_fp32_groups
    for ours, theirs, initial in zip(master, reference_master, start):
        moved = (theirs - initial).abs().mean()
        assert moved > 0
        assert (ours - theirs).abs().mean() < 0.02 * moved


EXPERT_WEIGHT = 8 * 64 * 64  # elements of one expert weight of the tiny model (8 experts, 64 x 64)


@pytest.mark.parametrize("fused_states", [None, torch.float32])
@pytest.mark.parametrize("case", [
    dict(),  # every gradient fits a reduce bucket
    # a bucket smaller than each expert weight, as in ds_configs/zero2_ep.json at full size
    dict(reduce_bucket_size=EXPERT_WEIGHT - 1),
    dict(grad_accum=2, reduce_bucket_size=EXPERT_WEIGHT - 1),
    dict(zero_stage=1, frozen=("self_attn",)),  # frozen weights have no hook; stage 1 reduces at the boundary
], ids=["all_small", "experts_large", "accumulated", "stage1_frozen"])
def test_gradients_left_in_place_train_as_their_copies(process_group, fused_states, case):
    """On one rank no gradient is copied: the small ones skip the bucket and the partition buffer, the large ones
    the partition buffer; the weights train bit for bit as DeepSpeed's copies do."""
    grad_accum = case.get("grad_accum", 1)
    reference_weights, _ = _train(zero_engine(fused_states=fused_states, **case)[0], grad_accum=grad_accum)
    engine, state = zero_engine(fused_states=fused_states, **case)
    optimizer = engine.optimizer
    copied, bucketed = [], []
    deepspeed_copy = optimizer.copy_grads_in_partition
    deepspeed_reduce = optimizer.reduce_independent_p_g_buckets_and_remove_grads
    optimizer.copy_grads_in_partition = lambda param, group_idx=None: (copied.append(param.numel()),
                                                                       deepspeed_copy(param, group_idx))
    optimizer.reduce_independent_p_g_buckets_and_remove_grads = lambda param, i: (bucketed.append(param.numel()),
                                                                                  deepspeed_reduce(param, i))
    assert keep_unreduced_grads_in_place(state)
    weights, _ = _train(engine, grad_accum=grad_accum)
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    large = sum(1 for p in trained if p.numel() > optimizer.reduce_bucket_size)
    assert (large > 0) == ("reduce_bucket_size" in case)
    assert copied == []
    assert len(bucketed) == 3 * grad_accum * large and all(n > optimizer.reduce_bucket_size for n in bucketed)
    assert len(trained) < len(weights) if "frozen" in case else len(trained) == len(weights)
    for name, weight in weights.items():
        assert torch.equal(weight, reference_weights[name]), name


def test_gate_up_caches_kept_by_the_step_train_as_concatenating_in_each_forward(process_group):
    engines = {}
    for cached in (False, True):
        engines[cached], state = zero_engine(fused_states=torch.float32)
        forwards = use_layout_preserving_gate_up(engines[cached].module)
        assert len(forwards) == 2
        if cached:
            assert mirror_gate_up_weights(state, forwards)
            caches = state.gate_up.entries
    reference, _ = _train(engines[False])
    weights, _ = _train(engines[True])
    for name, weight in weights.items():
        assert torch.equal(weight, reference[name]), name
    assert len(caches) == 2
    for cache, w1, w3 in caches:
        assert cache.builds == 1  # the first forward; every step since wrote it
        assert torch.equal(cache.weights, torch.cat([w1, w3], dim=1))

    zero_backward(engines[True], poison="model.layers.0.mlp.experts.w1")
    engines[True].step()  # skipped by DeepSpeed's own step: the caches are rebuilt, not trusted
    zero_backward(engines[True])
    assert [cache.builds for cache, _, _ in caches] == [2, 2]
