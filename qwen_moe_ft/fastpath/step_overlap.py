"""The one-pass optimizer step (zero_step._fused_step) overlapped with the next step's forward.

Reorders (upstream, only DeepSpeedZeroOptimizer.reduction_stream is replaced, below): the step's AdamW runs at about
a copy's bandwidth while the forward's GEMMs and attention are bound by arithmetic, so the two can share the GPU. The
forward's stages are the embedding, each decoder layer, and the final norm with the LM head after it
(forward_stages). The updates of each stage's weights are launched on a side stream in forward order, each stage's
followed by an event, and the stage's next forward (a forward pre-hook on its module) waits only for its own event;
the stream runs in order, so every earlier stage's update is done too. What belongs to no stage, or to several (a
coalesced run of small pieces that reaches outside one), and every group all-gathered over several ranks, is
updated on the current stream as before.

Anything that reads weights or moments other than through the stages' forwards (a checkpoint save, an export, a
state_dict) waits for the whole side stream first: settle(). The gradients the side stream reads stay referenced
here until the current stream has waited for their stage's event (that stage's forward, or settle()), and are let go
then: the allocator may give their memory to the forward at once, every use of it on the current stream being ordered
after the update's read. (With Tensor.record_stream instead, a block freed at launch would wait for the side stream to
pass the point of its free, i.e. all of the step's updates, so the next forward's activations took new memory.)

The step runs on a stream of the highest priority from then on (from before the model is loaded where the fast
path enters it then, FastPath.enter_step_stream: the allocator reuses a freed block only for its own stream), the
side stream keeps the lowest (the default stream's): where the forward's kernels and the updates both have blocks
waiting for SMs, the GPU's block scheduler dispatches the forward's first, and the updates take the SMs it leaves.
DeepSpeed's reduction stream (ZeRO's gradient reductions, and the gradient norms taken in the backward) is given the
step's priority, so that communication never waits behind the compute.

CUDA only. Guarded by tests/unit/fastpath/test_step_overlap.py: which launches go where (CPU), and on a GPU a
forward that waits for a deliberately late update, a gradient's memory kept from reuse until then and given to the
forward after it, and DeepSpeed's step with the overlap equal to it without.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .adamw import PieceUpdate
from .applied import Applied


def forward_stages(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module whose forward needs them, weights) in forward order for a transformers causal LM: the embedding,
    each decoder layer, the final norm with the LM head (whose weight the loss may read without calling it, but
    only after the norm); [] for a model without model.model.layers. A weight shared by two stages (tied
    embeddings) belongs to the first."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return []
    stages = [(layer, list(layer.parameters())) for layer in layers]
    if isinstance(embed := getattr(body, "embed_tokens", None), nn.Module):
        stages.insert(0, (embed, list(embed.parameters())))
    if isinstance(norm := getattr(body, "norm", None), nn.Module):
        head = getattr(model, "lm_head", None)
        head_params = list(head.parameters()) if isinstance(head, nn.Module) else []
        stages.append((norm, list(norm.parameters()) + head_params))
    return stages


def split_by_stage(pieces: list[PieceUpdate], owners: list, stage_of: dict[int, int]
                   ) -> tuple[list[PieceUpdate], dict[int, list[PieceUpdate]]]:
    """(launches for the current stream, {stage: launches for the side stream}). A launch goes to the side
    stream under the first stage it touches when every piece in it belongs to some stage; stages after that one
    wait for their own, later, events, which the stream's order puts after it."""
    current, side = [], {}
    for piece in pieces:
        stages = [stage_of.get(id(owner)) if owner is not None else None
                  for owner in owners[piece.first:piece.first + len(piece.grads)]]
        if stages and None not in stages:
            side.setdefault(min(stages), []).append(piece)
        else:
            current.append(piece)
    return current, side


# below the device's range: torch maps it to the highest priority there is
HIGHEST_PRIORITY = -(1 << 20)


def switch_to_step_stream(device: torch.device) -> torch.cuda.Stream:
    """A new stream of the highest priority, made the current one after the work already on the current one."""
    stream = torch.cuda.Stream(device=device, priority=HIGHEST_PRIORITY)
    stream.wait_stream(torch.cuda.current_stream(device))
    torch.cuda.set_stream(stream)
    return stream


def switch_back(previous: torch.cuda.Stream, step_stream: torch.cuda.Stream) -> None:
    """switch_to_step_stream undone: `previous` current again, after the work on the step's stream."""
    previous.wait_stream(step_stream)
    torch.cuda.set_stream(previous)


class StepOverlap:
    """The side stream, one event per forward stage, and the hooks that wait for them: each stage's forward for its
    own event, the model's state_dict for all of them. While it lives, the current stream is one of the highest
    priority: `step_stream`, already current (switch_to_step_stream), or one it switches to, and back from at
    remove()."""

    def __init__(self, model: nn.Module, stages: list[tuple[nn.Module, list[nn.Parameter]]], device: torch.device,
                 step_stream: torch.cuda.Stream | None = None):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._previous_stream = None if step_stream is not None else torch.cuda.current_stream(device)
        self.step_stream = step_stream if step_stream is not None else switch_to_step_stream(device)
        self.stage_of: dict[int, int] = {}
        for k, (_, params) in enumerate(stages):
            for param in params:
                self.stage_of.setdefault(id(param), k)
        self._events = [torch.cuda.Event() for _ in stages]
        self._pending = [False] * len(stages)
        self._held: list[list[torch.Tensor]] = [[] for _ in stages]  # gradients each stage's launches read
        self._ready = torch.cuda.Event()
        self._hooks = [module.register_forward_pre_hook(partial(self._wait_for, k))
                       for k, (module, _) in enumerate(stages)]
        self._hooks.append(model.register_state_dict_pre_hook(lambda *args, **kwargs: self.settle()))

    def _wait_for(self, k: int, module, args) -> None:
        if self._pending[k]:
            torch.cuda.current_stream(self.device).wait_event(self._events[k])
            self._pending[:k + 1] = [False] * (k + 1)
            self._release(k + 1)

    def begin(self) -> None:
        """The point of the current stream the side stream's launches start from: the step's gradients and its
        norm complete, the previous step's side work waited for."""
        self.settle()
        self._ready.record(torch.cuda.current_stream(self.device))

    def launch(self, side: dict[int, list[PieceUpdate]], grad_scale: torch.Tensor | None) -> None:
        """Run each stage's launches on the side stream, in forward order, recording its event after them."""
        if not side:
            return
        self.stream.wait_event(self._ready)
        if grad_scale is not None:
            grad_scale.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            for k in sorted(side):
                for piece in side[k]:
                    self._held[k] += piece.grads
                    piece.run()
                self._events[k].record(self.stream)
                self._pending[k] = True

    def settle(self) -> None:
        """The current stream waits for everything launched on the side stream."""
        if any(self._pending):
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._pending = [False] * len(self._pending)
        self._release(len(self._held))

    def _release(self, stages: int) -> None:
        """Let go of the gradients the first `stages` stages' launches read, the current stream having waited for
        those launches. The allocator reuses a block only on the stream it was allocated on: a one-rank group's
        gradient on the backward's, which is the current stream (or AccumulateGrad's, which waits for it); the
        other groups' gradients are views of DeepSpeed's partition buffer, which is never freed."""
        for k in range(stages):
            self._held[k] = []

    def remove(self) -> None:
        self.settle()
        for hook in self._hooks:
            hook.remove()
        if self._previous_stream is not None:
            switch_back(self._previous_stream, self.step_stream)


def mostly_frozen(model: nn.Module) -> bool:
    """Whether fewer than half of the model's weights train (LoRA): then the step's updates are small and host-bound,
    and the overlap has nothing to hide (no gain measured on the 48-layer LoRA step)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 2 * trainable < sum(p.numel() for p in model.parameters())


def overlap_step_with_forward(state, model: nn.Module, step_stream: torch.cuda.Stream | None = None) -> Applied:
    """Have the one-pass step (fuse_adam_step, installed first) run its updates of the forward's stages beside the
    next forward (state.overlap), the step on `step_stream` where it is already the current one; refused without
    the one-pass step, without CUDA, for a model without decoder layers, or one whose weights are mostly frozen."""
    name, replaces = ("step_overlap", "the one-pass step's launches on the current stream, "
                      "DeepSpeedZeroOptimizer.reduction_stream")
    device = torch.device(state.optimizer.device)
    stages = forward_stages(model)
    refused = ("needs one_pass_adamw" if not state.fused_step else "no decoder layers (model.model.layers)"
               if not stages else "most weights are frozen (LoRA): the step is small" if mostly_frozen(model)
               else "needs CUDA" if device.type != "cuda" else "")
    if not refused:
        state.overlap = StepOverlap(model, stages, device, step_stream)
        state.optimizer.reduction_stream = torch.cuda.Stream(device=device, priority=HIGHEST_PRIORITY)
    return Applied(name, replaces, refused)
