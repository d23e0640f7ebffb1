"""fp32 master weights kept as the bf16 weight plus its low 16 bits: the format joins back to every finite fp32
value bit for bit; MasterAdamW and DeepSpeed's ZeRO step with it keep the same fp32 masters as with fp32
partitions; a skipped step, a save and a load on DeepSpeed's real optimizer (one CPU rank, gloo) read and write
the fp32 masters they would have had. The bf16 weights alone as the masters (RoundedMasters, --master-weights bf16):
DeepSpeed's step lands each weight on a bf16 neighbour of its fp32 masters' update, unbiased; a save and a load
resume it bit for bit."""
import pytest
import torch

from helpers import assert_unbiased_rounding, zero_backward, zero_engine
from qwen_moe_ft.fastpath.adamw import MasterAdamW, Mirror, triton
from qwen_moe_ft.fastpath.master_bits import (MasterBits, RoundedMasters, join_master, keep_masters_in_weights,
                                              low_bits_keeping, split_master)

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _finite_values(n=200_000, seed=0) -> torch.Tensor:
    """Random fp32 bit patterns of every finite kind (either sign, zeros, subnormals, the largest), with exact
    ties between two bf16 values at an even and at an odd high half, and the low halves next to them."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=generator)
    low = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    bits[: n // 2] = (bits[: n // 2] & ~0xFFFF) | low[torch.arange(n // 2) % len(low)]  # ties and their neighbours
    special = torch.tensor([0x00000000, 0x80000000, 0x00008000, 0x80008000, 0x0000FFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                            0x7F7F7FFF, 0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000])
    bits = torch.cat([special, bits]).to(torch.int64)
    values = (bits - (bits >= 2**31) * 2**32).to(torch.int32).view(torch.float32)
    return values[torch.isfinite(values)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def test_a_master_split_and_joined_is_the_same_fp32_bits():
    values = _finite_values()
    weight, low = split_master(values)
    assert weight.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(_bits(join_master(weight, low)), _bits(values))


def test_the_weight_is_rounded_to_nearest_with_exact_ties_away_from_zero():
    values = _finite_values()
    weight, _ = split_master(values)
    tie = (_bits(values) & 0xFFFF) == 0x8000
    assert tie.sum() > 1000 and (~tie).sum() > 1000
    finite = torch.isfinite(values.bfloat16().float())  # values above bf16's largest round to infinity
    assert torch.equal(weight[~tie & finite], values[~tie & finite].bfloat16())
    # a tie is half a bf16 ulp from both neighbours: the one further from zero
    ties = values[tie & finite]
    away = weight[tie & finite].float().abs()
    assert torch.all(away > ties.abs())
    assert torch.all(away - ties.abs() == ties.abs() - _truncated(ties))


def _truncated(x: torch.Tensor) -> torch.Tensor:
    """|x| with its low 16 bits cleared: the bf16 value just below it in magnitude."""
    return ((_bits(x) & 0x7FFF0000).view(torch.float32)).abs()


def test_low_bits_keeping_a_weight_join_back_exactly_or_one_ulp_below_a_tie_rounded_to_even():
    values = _finite_values()
    weight, low = split_master(values)
    assert torch.equal(low_bits_keeping(values, weight), low)  # our own rounding: exact
    nearest_even = values.bfloat16()  # DeepSpeed's copy of an fp32 master
    finite = torch.isfinite(nearest_even.float())
    joined = join_master(nearest_even, low_bits_keeping(values, nearest_even))
    apart = (_bits(joined) - _bits(values))[finite]
    tie_down = ((_bits(values) & 0xFFFF) == 0x8000)[finite] & (nearest_even.float().abs() < values.abs())[finite]
    assert tie_down.sum() > 100
    assert torch.all(apart[~tie_down] == 0)
    assert torch.all(apart[tie_down] == -1)  # one fp32 ulp towards zero, for either sign


def _updates(low: bool, steps=4, n=50_000, state_dtype=torch.bfloat16, device="cpu", mirror=False):
    """(fp32 masters, bf16 weights, moments, mirror) after `steps` MasterAdamW updates, masters as fp32 or as low
    bits; a gate/up mirror of a [2, 5, n // 20] w1 / w3 pair where asked."""
    master = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    weight, bits = split_master(master) if low else (master.bfloat16(), None)
    adam = MasterAdamW([master], **HYPER, state_dtype=state_dtype)
    if low:
        master.zero_()  # unread: the masters are the weights and their low bits
    concat = torch.zeros(2, 10, n // 20, dtype=torch.bfloat16, device=device) if mirror else None
    half = n // 2
    mirrors = [Mirror(concat, 0, 5 * (n // 20)), Mirror(concat, 1, 5 * (n // 20))] if mirror else None
    for step in range(steps):
        grads = torch.randn(n, generator=torch.Generator().manual_seed(step)).bfloat16().to(device)
        adam.update(adam.param_groups[0], master, [grads[:half], grads[half:]], out=weight,
                    grad_scale=torch.tensor([2.0], device=device), mirrors=mirrors, low=bits)
    fp32 = join_master(weight, bits) if low else master
    return fp32, weight, adam.state[master], concat


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_masters_as_low_bits_update_as_fp32_masters_bit_for_bit(state_dtype):
    fp32, weight, state, _ = _updates(low=False, state_dtype=state_dtype)
    split_fp32, split_weight, split_state, _ = _updates(low=True, state_dtype=state_dtype)
    assert not torch.equal(fp32, torch.randn(50_000, generator=torch.Generator().manual_seed(0)))  # it trained
    assert (_bits(fp32) & 0xFFFF).ne(0).float().mean() > 0.99  # and its low bits are in use
    assert torch.equal(_bits(split_fp32), _bits(fp32))
    assert torch.equal(split_weight, split_master(fp32)[0])
    tie = (_bits(fp32) & 0xFFFF) == 0x8000
    assert torch.equal(split_weight[~tie], weight[~tie])  # the fp32 path's copy rounds to nearest-even
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(split_state[key], state[key])


def test_the_mirror_holds_the_weights_the_step_wrote():
    _, weight, _, concat = _updates(low=True, mirror=True)
    w = weight.numel() // 2
    assert torch.equal(concat, torch.cat([weight[:w].view(2, 5, -1), weight[w:].view(2, 5, -1)], dim=1))


def test_low_bits_need_a_bf16_weight_of_the_same_size():
    master = torch.randn(10)
    adam = MasterAdamW([master], **HYPER)
    with pytest.raises(ValueError, match="`out` in bf16 and `low` in int16"):
        adam.update(adam.param_groups[0], master, [torch.randn(10)], out=torch.zeros(10),
                    low=torch.zeros(10, dtype=torch.int16))


needs_triton = pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                                  reason="the Triton kernel needs a CUDA GPU")


@pytest.mark.gpu
@needs_triton
def test_triton_kernel_with_low_bits_keeps_the_masters_of_its_fp32_path():
    # both mirrored: a mirrored piece is a launch of its own, whose moments' random bits differ from a coalesced run's
    fp32, weight, state, _ = _updates(low=False, n=3_000_000, device="cuda", mirror=True)
    split_fp32, split_weight, split_state, concat = _updates(low=True, n=3_000_000, device="cuda", mirror=True)
    assert torch.equal(_bits(split_fp32), _bits(fp32))
    assert torch.equal(split_weight, split_master(fp32)[0])
    w = split_weight.numel() // 2
    assert torch.equal(concat, torch.cat([split_weight[:w].view(2, 5, -1), split_weight[w:].view(2, 5, -1)], dim=1))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(split_state[key], state[key])


def _train(engine, steps, poison_step=None, grad_accum=1):
    for step in range(steps):
        for micro_batch in range(grad_accum):
            poison = "model.layers.0.mlp.experts.w1" if step == poison_step and micro_batch == 0 else None
            zero_backward(engine, poison=poison, seed=1 + step * grad_accum + micro_batch)
            engine.step()


def _masters(engine, state) -> list[torch.Tensor]:
    if state.master_bits is not None:
        state.master_bits.settle()
    return [m.detach().clone() for m in engine.optimizer.single_partition_of_fp32_groups]


def _low_bits_engine(kind=MasterBits, **case):
    engine, state = zero_engine(fused_states=torch.bfloat16, **case)
    applied, hook = keep_masters_in_weights(state, engine.module, kind)
    assert applied and applied.name == kind.name and hook is not None
    return engine, state


@pytest.mark.parametrize("case", [dict(), dict(zero_stage=1), dict(grad_accum=2)], ids=["zero2", "zero1", "accum"])
def test_deepspeeds_step_with_low_bits_keeps_its_fp32_masters_and_releases_their_memory(process_group, case):
    # Two steps, the first skipped (a NaN gradient: DeepSpeed's own step, on the settled fp32 masters). A second
    # real step would start from weights that differ where a master was an exact tie (away from zero here,
    # to even there), and its gradients with them.
    grad_accum = case.get("grad_accum", 1)
    reference, reference_state = zero_engine(fused_states=torch.bfloat16, **case)
    _train(reference, 2, poison_step=0, grad_accum=grad_accum)
    engine, state = _low_bits_engine(**case)
    masters = engine.optimizer.single_partition_of_fp32_groups
    assert all(m.untyped_storage().nbytes() == 0 for m in masters)  # released at install
    _train(engine, 2, poison_step=0, grad_accum=grad_accum)
    assert engine.skipped_steps == reference.skipped_steps == 1
    assert all(m.untyped_storage().nbytes() == 0 for m in masters)  # released again by the step
    settled = _masters(engine, state)
    for ours, theirs in zip(settled, _masters(reference, reference_state)):
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    for i, master in enumerate(settled):  # each bf16 partition (the module's weights) is its masters' high half
        assert torch.equal(engine.optimizer.parallel_partitioned_bit16_groups[i][0], split_master(master)[0])


def test_deepspeeds_step_with_bf16_masters_lands_on_neighbours_of_its_fp32_masters(process_group):
    # the first step skipped (DeepSpeed's own, on the settled masters: the weights widened), the second the same
    # update from the same weights and gradients as the reference's, rounded stochastically instead of kept in fp32
    reference, reference_state = zero_engine(fused_states=torch.bfloat16)
    _train(reference, 2, poison_step=0)
    engine, state = _low_bits_engine(RoundedMasters)
    masters = engine.optimizer.single_partition_of_fp32_groups
    assert all(m.untyped_storage().nbytes() == 0 for m in masters) and state.master_bits.low is None
    _train(engine, 2, poison_step=0)
    assert engine.skipped_steps == reference.skipped_steps == 1
    assert all(m.untyped_storage().nbytes() == 0 for m in masters)
    for i, (ours, theirs) in enumerate(zip(_masters(engine, state), _masters(reference, reference_state))):
        weight = engine.optimizer.parallel_partitioned_bit16_groups[i][0]
        assert torch.equal(ours, weight.float())  # a reader of the fp32 masters gets the weights
        assert_unbiased_rounding(theirs, weight)
        assert (weight.float() != theirs).float().mean() > 0.9  # most updates land between bf16 values


@pytest.mark.parametrize("kind", [MasterBits, RoundedMasters], ids=["low_bits", "bf16_masters"])
def test_a_save_and_a_load_resume_the_masters_bit_for_bit(process_group, tmp_path, kind):
    engine, state = _low_bits_engine(kind)
    _train(engine, 2)
    engine.save_checkpoint(str(tmp_path), tag="two")  # DeepSpeed's state_dict settles the masters first
    _train(engine, 2)
    uninterrupted = _masters(engine, state)
    resumed, resumed_state = _low_bits_engine(kind)
    resumed.load_checkpoint(str(tmp_path), tag="two")
    assert resumed_state.master_bits.live  # loaded into the fp32 masters: the next forward takes the bits
    _train(resumed, 2)
    for ours, theirs in zip(_masters(resumed, resumed_state), uninterrupted):
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    for ours, theirs in zip(resumed.module.parameters(), engine.module.parameters()):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", [MasterBits, RoundedMasters], ids=["low_bits", "bf16_masters"])
@pytest.mark.parametrize("case, reason", [
    (dict(dtype=torch.float32, fused_states=torch.float32), "float32 weights"),
    (dict(fused_states=torch.bfloat16, frozen=("embed", "lm_head", "self_attn")), "frozen")])
def test_refused_for_fp32_weights_and_mostly_frozen_models(process_group, case, reason, kind):
    engine, state = zero_engine(**case)
    applied, hook = keep_masters_in_weights(state, engine.module, kind)
    assert not applied and hook is None and reason in applied.refused and state.master_bits is None
