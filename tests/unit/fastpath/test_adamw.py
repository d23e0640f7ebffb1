"""MasterAdamW against torch's AdamW: the same update with fp32 moments, unbiased bf16 moments, the
gradient taken in pieces with a bf16 copy written out, and (on a GPU) the Triton kernel = the torch path."""
import pytest
import torch

from helpers import assert_unbiased_rounding, bf16_bracket
from qwen_moe_ft.fastpath.adamw import MasterAdamW, Mirror, round_to_bf16_stochastic, triton

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _pair(n=1000, device="cpu", state_dtype=torch.float32):
    torch.manual_seed(0)
    start = torch.randn(n, device=device)
    reference = start.clone().requires_grad_()
    ours = start.clone()
    return (reference, torch.optim.AdamW([reference], **HYPER, foreach=False),
            ours, MasterAdamW([ours], **HYPER, state_dtype=state_dtype))


def test_fp32_moments_give_torch_adamw_updates_with_the_gradient_in_pieces_and_a_scale():
    reference, torch_adam, ours, master_adam = _pair()
    scale = torch.tensor([4.0])
    for _ in range(5):
        grad = torch.randn(1000)
        reference.grad = grad / 4.0
        torch_adam.step()
        master_adam.update(master_adam.param_groups[0], ours, [(grad[:300]), grad[300:]], grad_scale=scale)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-6, atol=1e-7)
    state = master_adam.state[ours]
    torch.testing.assert_close(state["exp_avg_sq"], torch_adam.state[reference]["exp_avg_sq"], rtol=1e-6, atol=0)
    assert int(state["step"]) == 5


def test_update_writes_the_bf16_copy_and_leaves_elements_past_the_gradient_alone():
    param = torch.randn(100)
    out = torch.zeros(100, dtype=torch.bfloat16)
    adam = MasterAdamW([param], **HYPER)
    before = param.clone()
    adam.update(adam.param_groups[0], param, [torch.randn(60, dtype=torch.bfloat16)], out=out)
    assert not torch.equal(param[:60], before[:60]) and torch.equal(param[60:], before[60:])
    assert torch.equal(out[:60], param[:60].bfloat16()) and not out[60:].any()
    with pytest.raises(ValueError, match="more than the parameter's 100 elements"):
        adam.update(adam.param_groups[0], param, [torch.randn(60), torch.randn(60)])


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from 1.0 to the next bf16 value 1 + 2**-7
    rounded = round_to_bf16_stochastic(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-9, rel=2e-5)
    negative = round_to_bf16_stochastic(-x, torch.Generator().manual_seed(0)).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2**-9), rel=2e-5)


def test_bf16_second_moment_keeps_decaying_where_round_to_nearest_would_stall():
    """beta2 = 0.999: after the gradient stops, v shrinks 0.1% a step, under half a bf16 ulp."""
    param = torch.zeros(10_000)
    adam = MasterAdamW([param], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, state_dtype=torch.bfloat16)
    group = adam.param_groups[0]
    adam.update(group, param, [torch.ones(10_000)])
    for _ in range(300):
        adam.update(group, param, [torch.zeros(10_000)])
    exact = 0.001 * 0.999**300  # fp32 moments give this
    assert adam.state[param]["exp_avg_sq"].dtype == torch.bfloat16
    assert adam.state[param]["exp_avg_sq"].float().mean().item() == pytest.approx(exact, rel=0.01)


def test_bf16_moments_track_fp32_adamw():
    reference, torch_adam, ours, master_adam = _pair(state_dtype=torch.bfloat16)
    for _ in range(20):
        grad = torch.randn(1000)
        reference.grad = grad.clone()
        torch_adam.step()
        master_adam.update(master_adam.param_groups[0], ours, [grad])
    moved = (reference.detach() - _pair()[2]).abs().mean()
    assert (ours - reference.detach()).abs().mean() < 0.01 * moved


def test_loaded_state_keeps_bf16_moments():
    param = torch.randn(10)
    adam = MasterAdamW([param], **HYPER)
    adam.update(adam.param_groups[0], param, [torch.randn(10)])
    saved = adam.state_dict()
    fresh = MasterAdamW([param], **HYPER)
    fresh.load_state_dict(saved)
    state = fresh.state[param]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg"], adam.state[param]["exp_avg"]) and int(state["step"]) == 1


needs_triton = pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                                  reason="the Triton kernel needs a CUDA GPU")


def _gpu_runs(state_dtype, steps, grads):
    """(param, bf16 copy, state) after `steps` updates on the Triton kernel and on the torch path."""
    runs = {}
    for path in ("triton", "torch"):
        torch.manual_seed(0)
        param = torch.randn(grads.numel(), device="cuda")
        out = torch.empty_like(param, dtype=torch.bfloat16)
        adam = MasterAdamW([param], **HYPER, state_dtype=state_dtype)
        if path == "torch":
            adam._triton_update = adam._torch_update
        for _ in range(steps):
            adam.update(adam.param_groups[0], param, [grads[:grads.numel() // 3], grads[grads.numel() // 3:]],
                        out=out, grad_scale=torch.tensor([2.0], device="cuda"))
        runs[path] = param, out, adam.state[param]
    return runs["triton"], runs["torch"]


@pytest.mark.gpu
@needs_triton
def test_triton_kernel_matches_the_torch_path_with_fp32_moments():
    grads = torch.randn(3_000_000, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).bfloat16()
    (p_triton, out_triton, s_triton), (p_torch, _, s_torch) = _gpu_runs(torch.float32, 3, grads)
    torch.testing.assert_close(p_triton, p_torch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_triton, p_triton.bfloat16(), rtol=0, atol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(s_triton[key], s_torch[key], rtol=1e-5, atol=1e-12)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("round_out", [False, True], ids=["fp32_masters", "bf16_masters"])
@pytest.mark.parametrize("inter", [96, 128])  # rows of 6144 elements, or whole blocks of the kernel's (4096)
def test_triton_kernel_writes_the_mirror_as_the_torch_path(inter, round_out):
    out, concat, shape = _mirrored_update("cuda", experts=8, inter=inter, hidden=64, round_out=round_out)
    w = shape[0] * shape[1] * shape[2]
    assert torch.equal(concat, torch.cat([out[:w].view(shape), out[w:2 * w].view(shape)], dim=1))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("tail", [5000, 8192])  # the piece starting inside one of the kernel's blocks, or on one
def test_triton_kernel_mirrors_past_2_to_the_31_and_across_a_row(tail):
    """A piece of w3 from just before the end of row 0 into row 1 of a mirror of 3.2G elements: row 1's half
    lies past 2**31, where 32-bit offsets would wrap."""
    block = 805_306_368
    concat = torch.zeros(2, 2, block, dtype=torch.bfloat16, device="cuda")
    param = torch.randn(2 * tail, device="cuda")
    out = torch.zeros(2 * tail, dtype=torch.bfloat16, device="cuda")
    adam = MasterAdamW([param], **HYPER)
    adam.update(adam.param_groups[0], param, [torch.randn(2 * tail, device="cuda").bfloat16()], out=out,
                mirrors=[Mirror(concat, half=1, block=block, start=block - tail)])
    assert torch.equal(concat[0, 1, -tail:], out[:tail]) and torch.equal(concat[1, 1, :tail], out[tail:])
    assert out.float().abs().min() > 0 and not concat[:, 0].any()


@pytest.mark.gpu
@needs_triton
def test_triton_kernel_rounds_bf16_moments_stochastically():
    """Every gradient (1 + 2**-9) / 0.1 x 2: the first moment is a quarter of the way between two bf16
    values, the second ~0.63 of the way; the kernel must store one of the two neighbours, the upper one
    that often, each moment and each element with its own noise (one Philox draw serves two moments of
    four elements, one in each quarter of a program's block)."""
    import qwen_moe_ft.fastpath.adamw as adamw

    grads = torch.full((3_000_000,), 2 * (1 + 2**-9) / 0.1, device="cuda")
    (p_triton, out_triton, s_triton), (p_torch, _, _) = _gpu_runs(torch.bfloat16, 1, grads)
    torch.testing.assert_close(p_triton, p_torch, rtol=1e-6, atol=1e-7)  # the step uses unrounded moments
    torch.testing.assert_close(out_triton, p_triton.bfloat16(), rtol=0, atol=0)
    ups = {}
    for key, exact in (("exp_avg", (grads[:1] / 2) * (1.0 - 0.9)), ("exp_avg_sq", (grads[:1] / 2) ** 2 * (1.0 - 0.95))):
        below, above = (bound.item() for bound in bf16_bracket(exact))
        stored = s_triton[key].float()
        assert set(stored.unique().tolist()) == {below, above}
        # 3M elements: the mean's standard error is under 3e-4 ulp, 2e-6 relative for both moments
        assert stored.mean().item() == pytest.approx(exact.item(), rel=1e-5)
        ups[key] = stored == above
    p_m, p_v = (ups[k].float().mean().item() for k in ups)
    # joint frequencies: the standard error is under 5e-4 for both (3M elements; 250k pairs of quarters)
    assert (ups["exp_avg"] & ups["exp_avg_sq"]).float().mean().item() == pytest.approx(p_m * p_v, abs=2.5e-3)
    block = adamw.KERNEL_BLOCK  # blocks count from the start of each gradient piece; the first is 1M long
    blocks = ups["exp_avg"][:1_000_000 // block * block].view(-1, 4, block // 4)
    assert (blocks[:, 0] & blocks[:, 1]).float().mean().item() == pytest.approx(p_m**2, abs=2.5e-3)


def test_an_lr_scheduler_of_the_replaced_optimizer_still_steers_after_a_load():
    """DeepSpeed's lr scheduler is built on the AdamW that fuse_adam_step replaces; a checkpoint load must
    not leave it steering group dicts the optimizer no longer reads."""
    param = torch.zeros(4)
    adam = torch.optim.AdamW([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, lambda step: 0.5**step)
    ours = MasterAdamW.replacing(adam, torch.bfloat16)
    ours.update(ours.param_groups[0], param, [torch.ones(4)])
    ours.load_state_dict(ours.state_dict())
    scheduler.step()
    assert ours.param_groups[0]["lr"] == 0.5


def test_small_gradients_updated_together_as_when_apart(monkeypatch):
    import qwen_moe_ft.fastpath.adamw as adamw

    sizes = [5, 7, 300, 2, 3, 400, 1]
    grads = [torch.randn(n) for n in sizes]
    results = []
    for small, run in ((1, 1), (100, 12)):  # every piece alone; small pieces merged in runs of 12 elements
        monkeypatch.setattr(adamw, "_SMALL", small)
        monkeypatch.setattr(adamw, "_RUN", run)
        param, out = torch.arange(800.0), torch.zeros(800, dtype=torch.bfloat16)
        adam = MasterAdamW([param], **HYPER, state_dtype=torch.float32)
        adam.update(adam.param_groups[0], param, grads, out=out)
        results.append((param, out))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[1][0][sum(sizes):], torch.arange(800.0)[sum(sizes):])
    pieces = adamw._coalesced(grads, [None] * len(grads))
    assert [(first, offset, sum(g.numel() for g in run)) for first, offset, run, _ in pieces] == [
        (0, 0, 12), (2, 12, 300), (3, 312, 5), (5, 317, 400), (6, 717, 1)]


def test_planned_launches_run_in_any_order_are_the_update(monkeypatch):
    import qwen_moe_ft.fastpath.adamw as adamw

    monkeypatch.setattr(adamw, "_SMALL", 100)
    monkeypatch.setattr(adamw, "_RUN", 12)
    torch.manual_seed(0)
    sizes = [5, 7, 300, 2, 3, 400, 1]
    results = []
    for planned in (False, True):
        param, out = torch.arange(800.0), torch.zeros(800, dtype=torch.bfloat16)
        adam = MasterAdamW([param], **HYPER, state_dtype=torch.bfloat16)
        for step in range(2):
            grads = [torch.randn(n, generator=torch.Generator().manual_seed(step * 10 + i))
                     for i, n in enumerate(sizes)]
            if planned:
                pieces = adam.plan(adam.param_groups[0], param, grads, out=out)
                assert [p.first for p in pieces] == [0, 2, 3, 5, 6]
                for piece in reversed(pieces):
                    piece.run()
            else:
                adam.update(adam.param_groups[0], param, grads, out=out)
        state = adam.state[param]
        results.append((param, out, state["exp_avg"], state["exp_avg_sq"], state["step"]))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def _mirrored_update(device, experts=3, inter=5, hidden=4, steps=2, round_out=False):
    """A partition [w1 | w3 | bias] of gate/up weights ([experts, inter, hidden] each) updated with w1 and w3
    mirrored into their concatenation, w3's gradient in two pieces split inside a row; (bf16 out, mirror). With
    `round_out` the bf16 out is the master."""
    block = inter * hidden
    w = experts * block
    torch.manual_seed(0)
    param = torch.randn(2 * w + 7, device=device)
    out = param.bfloat16() if round_out else torch.zeros(2 * w + 7, dtype=torch.bfloat16, device=device)
    concat = torch.zeros(experts, 2 * inter, hidden, dtype=torch.bfloat16, device=device)
    adam = MasterAdamW([param], **HYPER, state_dtype=torch.float32)
    split = block + 3
    mirrors = [Mirror(concat, half=0, block=block), Mirror(concat, half=1, block=block),
               Mirror(concat, half=1, block=block, start=split), None]
    for _ in range(steps):
        grad = torch.randn(2 * w + 7, device=device).bfloat16()
        adam.update(adam.param_groups[0], param, list(grad.split([w, split, w - split, 7])), out=out,
                    mirrors=mirrors, round_out=round_out)
    return out, concat, (experts, inter, hidden)


@pytest.mark.parametrize("round_out", [False, True], ids=["fp32_masters", "bf16_masters"])
def test_mirror_holds_the_gate_up_concatenation_of_the_bf16_weights(monkeypatch, round_out):
    import qwen_moe_ft.fastpath.adamw as adamw

    monkeypatch.setattr(adamw, "_TORCH_CHUNK", 7)  # chunks that start and end inside rows
    out, concat, shape = _mirrored_update("cpu", round_out=round_out)
    w = shape[0] * shape[1] * shape[2]
    expected = torch.cat([out[:w].view(shape), out[w:2 * w].view(shape)], dim=1)
    assert torch.equal(concat, expected)
    with pytest.raises(ValueError, match="1 mirrors for 2 gradient pieces"):
        MasterAdamW([torch.zeros(4)]).update({"lr": 1.0, "betas": (0.9, 0.9), "eps": 1e-8, "weight_decay": 0.0},
                                             torch.zeros(4), [torch.ones(2), torch.ones(2)], mirrors=[None])


def _bf16_master_step(device: str, n: int, state_dtype=torch.float32):
    """(fp32 masters, bf16 masters, moments of each, the gradient) after one update from the same bf16 weights and
    gradient: MasterAdamW on fp32 masters, and with the bf16 weights as the masters (round_out)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n, generator=generator).bfloat16().to(device)
    grad = torch.randn(n, generator=generator).bfloat16().to(device)
    master, key, rounded = weight.float(), torch.empty(n, device=device), weight.clone()
    fp32_adam = MasterAdamW([master], **HYPER, state_dtype=state_dtype)
    bf16_adam = MasterAdamW([key], **HYPER, state_dtype=state_dtype)
    fp32_adam.update(fp32_adam.param_groups[0], master, [grad[: n // 3], grad[n // 3:]])
    bf16_adam.update(bf16_adam.param_groups[0], key, [grad[: n // 3], grad[n // 3:]], out=rounded, round_out=True)
    return master, rounded, fp32_adam.state[master], bf16_adam.state[key], grad


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_bf16_masters_take_a_neighbour_of_the_fp32_masters_update_unbiased(state_dtype):
    master, rounded, fp32_state, bf16_state, _ = _bf16_master_step("cpu", 300_000, state_dtype)
    assert_unbiased_rounding(master, rounded)
    assert (rounded.float() != master).float().mean() > 0.99  # the update lands between bf16 values
    for key in ("exp_avg", "exp_avg_sq"):  # the moments do not depend on the master
        assert torch.equal(bf16_state[key], fp32_state[key])


def test_bf16_masters_move_by_updates_under_half_an_ulp():
    """lr 2**-10 on weights at 1.0 (bf16 spacing 2**-8 below it): round-to-nearest bf16 weights would never move.
    Rounded stochastically, 32 steps move them as far on average as fp32 masters do."""
    assert torch.tensor(1.0 - 2**-10).bfloat16().item() == 1.0  # the premise
    n = 100_000
    key, weight = torch.empty(n), torch.ones(n, dtype=torch.bfloat16)
    adam = MasterAdamW([key], lr=2**-10, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, state_dtype=torch.float32)
    for _ in range(32):
        adam.update(adam.param_groups[0], key, [torch.ones(n)], out=weight, round_out=True)
    # fp32 masters: 1 - 32 * 2**-10 (constant gradient: each bias-corrected step is lr). Each element's 32 roundings
    # add independent errors of at most one spacing (2**-8): sd <= sqrt(32) * 2**-8 / 2, over n elements 3.5e-5
    assert weight.float().mean().item() == pytest.approx(1 - 32 * 2**-10, abs=3e-4)
    assert weight.float().std().item() > 2**-9  # and each weight its own way


def test_bf16_masters_need_a_bf16_out_of_the_parameters_size_and_other_masters_are_fp32():
    key = torch.zeros(10)
    adam = MasterAdamW([key], **HYPER)
    for out, low in ((None, None), (torch.zeros(10), None), (torch.zeros(9, dtype=torch.bfloat16), None),
                     (torch.zeros(10, dtype=torch.bfloat16), torch.zeros(10, dtype=torch.int16))):
        with pytest.raises(ValueError, match="rounded bf16 weight needs `out` in bf16"):
            adam.update(adam.param_groups[0], key, [torch.randn(10)], out=out, low=low, round_out=True)
    weight = torch.zeros(10, dtype=torch.bfloat16)
    weight.grad = torch.ones(10, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="updates fp32 masters, got a torch.bfloat16 parameter"):
        MasterAdamW([weight], **HYPER).step()  # the launches would take it for round_out's master


def _rounded_up(exact: torch.Tensor, rounded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each value was rounded to the upper of its two bf16 neighbours, the chance it had of that)."""
    below, above = bf16_bracket(exact)
    return rounded.float() == above, ((exact - below) / (above - below)).abs()


def _noise_correlation(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean product of two roundings' residuals (up - chance): 0 in expectation for independent noise; each factor's
    variance is at most 1/4, so the mean over n pairs has a standard error under 1 / (4 sqrt(n))."""
    return ((a[0].double() - a[1].double()) * (b[0].double() - b[1].double())).mean().item()


@pytest.mark.gpu
@needs_triton
def test_triton_kernel_rounds_bf16_masters_unbiased_with_noise_of_their_own():
    """3M elements in two pieces (launches of their own): the weights land unbiased around the fp32 masters' update;
    the moments are those of fp32 masters bit for bit (the weights' draw leaves theirs alone); and the weights' noise
    is independent of the moments' and of the other quarters' of a program's block (one draw serves four elements)."""
    import qwen_moe_ft.fastpath.adamw as adamw

    n = 3_000_000
    master, rounded, fp32_state, bf16_state, grad = _bf16_master_step("cuda", n, torch.bfloat16)
    assert_unbiased_rounding(master, rounded)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(bf16_state[key], fp32_state[key])
    weight = _rounded_up(master, rounded)
    first_moment = grad.float() * torch.tensor(1.0 - HYPER["betas"][0], device="cuda")  # step 1 from zero moments
    moment = _rounded_up(first_moment, bf16_state["exp_avg"])
    free = (weight[1] > 0) & (moment[1] > 0)  # values bf16 does not hold: noise decides
    # about a fifth of the moments are bf16 values: 0.1f is 1.6 x 2**-4, and g x 1.6 is one where g's 8-bit
    # significand is a multiple of 5
    assert int(free.sum()) > n * 0.7
    # standard error under 1 / (4 sqrt(2.1M)) = 1.7e-4: a shared draw would give ~0.05 here
    assert abs(_noise_correlation(tuple(t[free] for t in weight), tuple(t[free] for t in moment))) < 1e-3
    block = adamw.KERNEL_BLOCK
    quarters = [t[:n // 3 // block * block].view(-1, 4, block // 4) for t in weight]
    for k in (1, 2, 3):
        assert abs(_noise_correlation((quarters[0][:, 0], quarters[1][:, 0]),
                                      (quarters[0][:, k], quarters[1][:, k]))) < 2e-3  # SE under 4e-4 (250k pairs)
