"""The one-pass step's decoder-layer updates beside the next forward (fastpath/step_overlap.py): which launches go to
the side stream (CPU), and on a GPU, with the side stream held back on purpose so that a forward that did not
wait would read the old weights: the forward waits for its layer, freed gradients keep their memory until the
update has read them, and DeepSpeed's step with the overlap trains as without it."""
import pytest
import torch
from torch import nn

from helpers import TINY, autoep_engine, zero_backward, zero_engine
from qwen_moe_ft.fastpath import FastPath
from qwen_moe_ft.fastpath.adamw import PieceUpdate
from qwen_moe_ft.fastpath.state import ZeroState
from qwen_moe_ft.fastpath.step_overlap import StepOverlap, forward_stages, overlap_step_with_forward, split_by_stage

HOLD_CYCLES = 200_000_000  # ~0.1 s of GPU clock: far longer than the host takes to reach the forward


def _piece(first: int, count: int) -> PieceUpdate:
    return PieceUpdate(first, [torch.zeros(1)] * count, lambda: None)


def test_launches_wholly_inside_one_stage_go_to_the_side_stream_under_their_first_stage():
    embed, norm, a0, b0, a1, b1 = (nn.Parameter(torch.zeros(1)) for _ in range(6))
    stage_of = {id(a0): 1, id(b0): 1, id(a1): 2, id(b1): 2}
    owners = [embed, a0, b0, a1, b1, norm, None]
    pieces = [_piece(0, 1), _piece(1, 2), _piece(3, 2), _piece(5, 1), _piece(6, 1)]
    current, side = split_by_stage(pieces, owners, stage_of)
    assert [p.first for p in current] == [0, 5, 6]  # no stage: the embedding and norm here, padding
    assert {k: [p.first for p in v] for k, v in side.items()} == {1: [1], 2: [3]}
    # a run that reaches from stage 2 into a weight of no stage stays on the current stream
    current, side = split_by_stage([_piece(0, 1), _piece(1, 4), _piece(5, 2)], owners, stage_of)
    assert [p.first for p in current] == [0, 5] and {k: [p.first for p in v] for k, v in side.items()} == {1: [1]}


def test_stages_of_the_tiny_model_in_forward_order_and_refusals_off_cuda():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY)
    stages = forward_stages(model)
    assert [module for module, _ in stages] == [model.model.embed_tokens, *model.model.layers, model.model.norm]
    assert stages[-1][1] == [model.model.norm.weight, model.lm_head.weight]
    assert sum(len(params) for _, params in stages) == len(list(model.parameters()))  # every weight in one stage
    assert forward_stages(nn.Linear(2, 2)) == []

    class _Optimizer:
        device = "cpu"

    state = ZeroState(_Optimizer())
    assert overlap_step_with_forward(state, model).refused == "needs one_pass_adamw"
    state.fused_step = True
    assert overlap_step_with_forward(state, model).refused == "needs CUDA"  # this optimizer's device
    for name, param in model.named_parameters():
        param.requires_grad_("norm" in name)  # LoRA-like: most weights frozen
    assert overlap_step_with_forward(state, model).refused == "most weights are frozen (LoRA): the step is small"


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Linear(256, 256, bias=False) for _ in range(2)])

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return x


def _late(run):
    """A launch that first holds the side stream back."""
    def held():
        torch.cuda._sleep(HOLD_CYCLES)
        run()
    return held


@pytest.mark.gpu
def test_a_layers_forward_waits_for_its_own_update():
    torch.manual_seed(0)
    stack = _Stack().cuda()
    overlap = StepOverlap(stack, forward_stages(stack), torch.device("cuda"))
    new = [torch.randn_like(layer.weight) for layer in stack.model.layers]
    x = torch.randn(8, 256, device="cuda")
    expected = x @ new[0].T @ new[1].T
    overlap.begin()
    side = {k: [PieceUpdate(0, [], _late(lambda w=layer.weight, v=new[k]: w.data.copy_(v)))]
            for k, layer in enumerate(stack.model.layers)}
    overlap.launch(side, None)
    assert not overlap.stream.query()  # still held back: a forward that did not wait would read the old weights
    with torch.no_grad():
        out = stack(x)
    torch.testing.assert_close(out, expected)
    overlap.remove()


@pytest.mark.gpu
def test_the_step_runs_above_the_side_stream_until_the_overlap_is_removed():
    before = torch.cuda.current_stream()
    stack = _Stack().cuda()
    overlap = StepOverlap(stack, forward_stages(stack), torch.device("cuda"))
    current = torch.cuda.current_stream()
    assert current == overlap.step_stream != before
    assert current.priority < overlap.stream.priority  # lower is higher: the forward's blocks go first
    overlap.remove()
    assert torch.cuda.current_stream() == before


@pytest.mark.gpu
def test_a_dropped_gradient_keeps_its_memory_until_its_stages_forward_has_waited():
    stack = _Stack().cuda()
    overlap = StepOverlap(stack, forward_stages(stack), torch.device("cuda"))
    grad = torch.full((1 << 20,), 3.0, device="cuda")
    out = torch.zeros_like(grad)
    overlap.begin()
    overlap.launch({0: [PieceUpdate(0, [grad], _late(lambda g=grad: out.copy_(g * 2)))]}, None)
    del grad  # the step drops its references as soon as it has launched
    reuse = torch.empty(1 << 20, device="cuda")  # were the gradient let go here, the freed block itself
    reuse.fill_(-1.0)
    overlap.settle()
    assert torch.equal(out, torch.full_like(out, 6.0))
    overlap.remove()


@pytest.mark.gpu
def test_a_stages_forward_gives_the_gradients_its_update_read_back_for_reuse():
    stack = _Stack().cuda()
    overlap = StepOverlap(stack, forward_stages(stack), torch.device("cuda"))
    torch.cuda.empty_cache()  # no cached block of the gradient's size but its own once it is let go
    x = torch.randn(8, 256, device="cuda")
    with torch.no_grad():
        stack.model.layers[0](x)  # cuBLAS's workspace on the step's stream, taken before anything is counted
    grad = torch.full((1 << 20,), 3.0, device="cuda")
    block, size = grad.data_ptr(), grad.numel() * grad.element_size()
    out = torch.zeros_like(grad)
    overlap.begin()
    overlap.launch({0: [PieceUpdate(0, [grad], _late(lambda g=grad: out.copy_(g * 2)))]}, None)
    del grad  # the step drops its references as soon as it has launched
    held = torch.cuda.memory_allocated()
    with torch.no_grad():
        stack.model.layers[0](x)  # waits for stage 0's update, then lets its gradient go
    assert torch.cuda.memory_allocated() == held - size  # at once: the host does not wait for the GPU
    assert not overlap.stream.query()  # the update has not run yet
    reuse = torch.empty(1 << 20, device="cuda")
    assert reuse.data_ptr() == block  # the forward's next allocation takes the block
    reuse.fill_(-1.0)  # ordered after the update's read by the forward's wait
    overlap.settle()
    assert torch.equal(out, torch.full_like(out, 6.0))
    overlap.remove()


@pytest.mark.gpu
def test_deepspeed_step_with_the_overlap_trains_as_without_it(process_group, monkeypatch):
    held_launch = StepOverlap.launch

    def launch_late(self, side, grad_scale):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(HOLD_CYCLES)
        held_launch(self, side, grad_scale)

    monkeypatch.setattr(StepOverlap, "launch", launch_late)
    import qwen_moe_ft.fastpath.adamw as adamw

    monkeypatch.setattr(adamw, "_SMALL", 1)  # a launch per weight, so that every stage has launches of its own
    ids = torch.randint(0, 2048, (1, 96), generator=torch.Generator().manual_seed(1)).cuda()
    before, after, masters = {}, {}, {}
    for overlapped in (False, True):
        engine, state = zero_engine(fused_states=torch.float32)
        if overlapped:
            assert overlap_step_with_forward(state, engine.module)
            assert engine.optimizer.reduction_stream.priority == state.overlap.step_stream.priority
        with torch.no_grad():
            before[overlapped] = engine(input_ids=ids, labels=ids).loss.item()
        zero_backward(engine)  # the same batch as `ids`
        engine.step()
        if overlapped:
            assert all(state.overlap._pending)  # every stage's update is still on the side stream
        with torch.no_grad():
            after[overlapped] = engine(input_ids=ids, labels=ids).loss.item()
        engine.module.state_dict()  # waits for the side stream (the model's state_dict pre-hook)
        masters[overlapped] = [m.clone() for m in engine.optimizer.single_partition_of_fp32_groups]
        if overlapped:
            state.overlap.remove()
    # one step moves this batch's loss by far more than the tolerance: a forward that read the old weights fails
    assert abs(after[False] - before[False]) > 1e-2 * abs(before[False])
    assert after[True] == pytest.approx(after[False], rel=1e-4)
    for ours, theirs in zip(masters[True], masters[False]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_an_engine_built_after_the_step_stream_is_entered_keeps_its_memory_on_that_stream(process_group):
    before = torch.cuda.current_stream()
    fast_path = FastPath()
    fast_path.enter_step_stream(torch.device("cuda"))
    step_stream = torch.cuda.current_stream()
    assert step_stream != before and step_stream.priority < before.priority
    engine = autoep_engine()
    assert {a.name: a for a in fast_path.install(engine)}["step_overlap"]
    assert fast_path._zero_state.overlap.step_stream == step_stream == torch.cuda.current_stream()  # no second switch
    # DeepSpeed's flat bf16 weights, built after the load: on the default stream, memory the load freed (the weights
    # before flattening) could not be reused by the step, which allocates on the step's stream
    flat = engine.optimizer.bit16_groups_flat[0].data_ptr()
    segment, = [s for s in torch.cuda.memory_snapshot() if s["address"] <= flat < s["address"] + s["total_size"]]
    assert segment["stream"] == step_stream.cuda_stream
    fast_path.restore()
    assert torch.cuda.current_stream() == before
