"""The fast path: every replacement of DeepSpeed, transformers or liger-kernel internals, applied in one place.

`--fast-path on` (the default) installs the patches below; `--fast-path off` trains on stock DeepSpeed
ZeRO-2 + AutoEP as ds_configs/zero2_ep.json configures it and imports none of them. Each patch module
names, in its header, the upstream symbols it replaces (at the pinned versions) and the test that guards
it; what each patch changed is measured in docs/benchmark-history.md, by commit.

The order matters, and is this:
 1. liger_norm_rope            (liger.py) before DeepSpeed wraps the model, then triton_hidden_norms
    and quack_head_norms       (norms.py, rms_norm.py): the hidden-size norms on our Triton kernels (torch's where
                               they do not run), the q/k norms on quack's (ours where it is refused)
 2. one_pass_grad_norm         (grad_norm.py) the step's norm and overflow check
 3. grads_in_place             (zero_step.py) its gradient hook takes norms in the backward for 2
 4. one_pass_adamw             (zero_step.py, adamw.py) replaces the wrapped AdamW before its first step
    master_low_bits            (master_bits.py) 4's fp32 masters as the bf16 weights' low bits (full fine-tuning),
    or bf16_master_weights     the bf16 weights alone as the masters, rounded stochastically (--master-weights bf16)
 5. clip_in_adam               (zero_step.py) only where 4 is refused
    step_overlap               (step_overlap.py) 4's updates on a side stream, stage by stage beside the next
                               forward (full fine-tuning)
 6. layout_preserving_gate_up  (expert_mlp.py) the expert modules' forward
 7. gate_up_cache              (gate_up_cache.py) needs 4, which writes the caches, and 6, which reads them
 8. one_rank_dispatch          (local_dispatch.py) AutoEP's MoE block at EP=1
 9. quack_experts              (quack_experts.py) 8's experts on quack's kernels (--expert-kernels auto|quack)
    quack_scored_combine       (quack_experts.py, local_dispatch.py) 9's blocks with the weighted combine inside
                               quack's chain: no expert output row kept, none of their gradients written
10. scored_swiglu              (scored_swiglu.py, local_dispatch.py) in 8's blocks over 6's SwiGLU experts (not 9's),
                               the routing scores in the activation and the combine unweighted
11. lean_topk_router           (topk_router.py) every AutoEP block's router, at any EP size
12. fused_attention_inputs     (attention_inputs.py) the attention's q/k/v projections, q/k norms and RoPE; after
                               LoRA, whose wrapped projections it leaves to the stock forward

`--fast-path-skip` leaves out any of SKIPPABLE (nothing else builds on them), say one that fails on a new GPU.

The patch modules import private DeepSpeed symbols, so they are imported here only once the version guard
(versions.py) has passed: on other versions one warning names them and the run continues on the stock path.
What the patches share lives in a ZeroState held by this object, never on DeepSpeed's objects.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..config import ConfigError
from . import versions
from .applied import Applied

STATE_DTYPES = ("bf16", "fp32")
# The patches --fast-path-skip can leave out: none of the others builds on them, and each has a stock (or other
# patched) path to fall back to
SKIPPABLE = ("triton_hidden_norms", "quack_head_norms", "triton_head_norms", "scored_swiglu", "quack_experts",
             "quack_scored_combine", "lean_topk_router", "fused_attention_inputs", "step_overlap", "master_low_bits")


def parse_skip(text: str) -> tuple[str, ...]:
    """--fast-path-skip's comma list, every name one of SKIPPABLE."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if unknown := [name for name in names if name not in SKIPPABLE]:
        raise ConfigError(f"--fast-path-skip: {', '.join(unknown)} cannot be left out; the patches that can: "
                          f"{', '.join(SKIPPABLE)}")
    return names


def overlap_asked(fastpath, lora) -> bool:
    """Whether step_overlap is on a run's list, from its fastpath and lora config sections: the fast path on, full
    fine-tuning, not in --fast-path-skip (installing it still needs CUDA, the pinned versions and the one-pass step)."""
    return fastpath.mode == "on" and not lora.enabled and "step_overlap" not in parse_skip(fastpath.skip)


class FastPath:
    def __init__(self, enabled: bool = True, skip: str = ""):
        """skip: --fast-path-skip's comma list."""
        self.applied: list[Applied] = []
        self.skip = parse_skip(skip)
        self.off_because = "" if enabled else "--fast-path off"
        if enabled and (mismatches := versions.mismatches()):
            self.off_because = "written for other versions: " + "; ".join(mismatches)
            warnings.warn(f"the fast path is not installed, {self.off_because}; the run continues on stock "
                          "DeepSpeed ZeRO-2 + AutoEP (slower, same results)", stacklevel=2)
        self._zero_state = None
        self._restore = []
        self._step_stream = self._stream_before = None  # enter_step_stream's

    def _unless_skipped(self, name: str, apply) -> Applied:
        """apply(), or, for a patch in --fast-path-skip, a refusal saying so."""
        return Applied(name, "", "--fast-path-skip") if name in self.skip else apply()

    @property
    def on(self) -> bool:
        return not self.off_because

    def enter_step_stream(self, device) -> None:
        """Before the model is loaded, for a run step_overlap is asked for (overlap_asked), on CUDA with the fast path
        on: the step's stream of the highest priority becomes the current one now rather than at install. The
        caching allocator gives a freed block only to allocations on the stream it was allocated on, so what the
        load and the engine's build free (the weights before DeepSpeed flattens them, the fp32 partitions the
        masters' low bits replace) would otherwise stay reserved for the stream the steps no longer run on.
        restore() leaves it."""
        if not self.on or device.type != "cuda" or self._step_stream is not None:
            return
        import torch

        from .step_overlap import switch_to_step_stream

        self._stream_before = torch.cuda.current_stream(device)
        self._step_stream = switch_to_step_stream(device)

    def prepare_model(self, model: nn.Module, fused_kernels: str, device_type: str) -> tuple[nn.Module, str]:
        """Before DeepSpeed wraps the model: liger's norms and RoPE if chosen (--fused-kernels), then torch's and
        quack's norms where they suit better; returns the model and the kernel choice made."""
        if not self.on:
            return model, "none"
        from .liger import apply_liger, select_fused_kernels

        choice = select_fused_kernels(fused_kernels, device_type)
        applied, restore = apply_liger(model, choice)
        self.applied.append(applied)
        self._restore.append(restore)
        if choice == "liger":
            import torch

            from .norms import HEAD_NORMS, HIDDEN_NORMS, quack_head_norms, torch_hidden_norms, triton_norms

            device = torch.device(device_type)
            hidden = self._unless_skipped("triton_hidden_norms", lambda: triton_norms(model, device, HIDDEN_NORMS))
            self.applied += [hidden] if hidden else [hidden, torch_hidden_norms(model)]
            head = self._unless_skipped("quack_head_norms", lambda: quack_head_norms(model, device))
            self.applied.append(head)
            if not head:
                self.applied.append(self._unless_skipped("triton_head_norms",
                                                         lambda: triton_norms(model, device, HEAD_NORMS)))
        return model, choice

    def install(self, engine, *, adam_states: str = "bf16", gate_up_recompute: bool = False,
                expert_kernels: str = "auto", master_weights: str = "fp32") -> list[Applied]:
        """Patch the DeepSpeed engine's ZeRO optimizer and its AutoEP modules, in the order above."""
        if not self.on:
            if master_weights == "bf16":
                raise ConfigError(f"--master-weights bf16: the fast path is off ({self.off_because}); its masters are "
                                  "the fast path's, use --master-weights fp32")
            return []
        import torch

        from .expert_mlp import use_layout_preserving_gate_up
        from .grad_norm import lean_grad_checks
        from .local_dispatch import (one_rank_dispatch, quack_expert_kernels, quack_scored_combine,
                                     scored_swiglu_blocks)
        from .state import ZeroState
        from .topk_router import lean_topk_routers
        from .zero_step import fold_clip_into_adam, fuse_adam_step, keep_unreduced_grads_in_place, mirror_gate_up_weights

        if adam_states not in STATE_DTYPES:
            raise ValueError(f"adam_states must be one of {STATE_DTYPES}, got {adam_states!r}")
        if expert_kernels == "quack" and "quack_experts" in self.skip:
            raise ConfigError("--expert-kernels quack with quack_experts in --fast-path-skip: choose one")
        state = self._zero_state = ZeroState(engine.optimizer)
        self.applied += [lean_grad_checks(state), keep_unreduced_grads_in_place(state),
                         fuse_adam_step(state, torch.bfloat16 if adam_states == "bf16" else torch.float32)]
        if master_weights == "bf16" and not state.fused_step:
            raise ConfigError(f"--master-weights bf16 needs one_pass_adamw: {self.applied[-1].refused}; use "
                              "--master-weights fp32")
        if state.fused_step:
            from .master_bits import MasterBits, RoundedMasters
            from .step_overlap import overlap_step_with_forward

            if master_weights == "bf16":
                rounded = self._master_bits(state, engine.module, RoundedMasters)
                if not rounded:
                    raise ConfigError(f"--master-weights bf16: {rounded.refused}; use --master-weights fp32")
                self.applied.append(rounded)
            else:
                self.applied.append(self._unless_skipped("master_low_bits",
                                                         lambda: self._master_bits(state, engine.module, MasterBits)))
            self.applied.append(self._unless_skipped(
                "step_overlap", lambda: overlap_step_with_forward(state, engine.module, self._step_stream)))
        else:
            self.applied.append(fold_clip_into_adam(state))
        forwards = use_layout_preserving_gate_up(engine.module, recompute=gate_up_recompute)
        self.applied.append(Applied("layout_preserving_gate_up", "GroupedExperts.forward (fused gate/up)",
                                    "" if forwards else "no trainable expert module runs the fused gate/up on torch._grouped_mm"))
        self.applied += [mirror_gate_up_weights(state, forwards),
                         one_rank_dispatch(engine.module, scored="scored_swiglu" not in self.skip)]
        if expert_kernels != "torch":
            quack = self._unless_skipped("quack_experts", lambda: quack_expert_kernels(engine.module))
            if expert_kernels == "quack" and not quack:
                raise ConfigError(f"--expert-kernels quack: {quack.refused}; use --expert-kernels auto or torch")
            self.applied.append(quack)
            if quack:
                self.applied.append(self._unless_skipped("quack_scored_combine",
                                                         lambda: quack_scored_combine(engine.module)))
        self.applied.append(self._unless_skipped("scored_swiglu", lambda: scored_swiglu_blocks(engine.module)))
        self.applied.append(self._unless_skipped("lean_topk_router", lambda: lean_topk_routers(engine.module)))
        from .attention_inputs import fused_attention_inputs

        device = next(engine.module.parameters()).device
        self.applied.append(self._unless_skipped("fused_attention_inputs",
                                                 lambda: fused_attention_inputs(engine.module, device)))
        return self.applied

    def _master_bits(self, state, model: nn.Module, kind) -> Applied:
        """keep_masters_in_weights of `kind` (master_bits.MasterBits or RoundedMasters), its hook removed at restore."""
        from .master_bits import keep_masters_in_weights

        applied, hook = keep_masters_in_weights(state, model, kind)
        if hook is not None:
            self._restore.append(hook.remove)
        return applied

    def settle(self) -> None:
        """Before weights or optimizer state are read other than by the forward (a checkpoint, an export): the
        step's updates still running beside the forward (step_overlap) are waited for, and the fp32 master weights
        kept as low bits (master_low_bits) are written out."""
        if self._zero_state is not None:
            self._zero_state.settle()

    def after_load(self) -> None:
        """After a checkpoint load wrote the weights: caches built from the old ones are rebuilt, and moments that
        DeepSpeed's universal load put in fp32 are narrowed to the one-pass AdamW's dtype again."""
        state = self._zero_state
        if state is not None:
            state.gate_up.invalidate()
            if state.fused_step:
                state.optimizer.optimizer.keep_state_dtype()

    @property
    def adam_states(self) -> str:
        """The dtype of Adam's moments this run really uses: DeepSpeed's own step keeps them in fp32."""
        state = self._zero_state
        if state is None or not state.fused_step:
            return "fp32"
        return "bf16" if state.optimizer.optimizer.state_dtype.itemsize == 2 else "fp32"

    def summary(self) -> str:
        """The startup line's account: each patch applied, each refused with its reason."""
        if not self.on:
            return f"fast path off ({self.off_because})"
        on = [a.name for a in self.applied if a]
        refused = [a.describe() for a in self.applied if not a]
        return f"fast path: {', '.join(on) or 'nothing applied'}" + (f"; refused: {'; '.join(refused)}" if refused else "")

    def restore(self) -> None:
        """Put back what the patches replaced for the whole process (the engine's own patches die with it)."""
        self.settle()
        for restore in self._restore:
            restore()
        self._restore = []
        if self._zero_state is not None and self._zero_state.overlap is not None:
            self._zero_state.overlap.remove()
            self._zero_state.overlap = None
        if self._zero_state is not None:
            self._zero_state.master_bits = None  # settled above: the step reads the fp32 masters again
        if self._step_stream is not None:
            from .step_overlap import switch_back

            switch_back(self._stream_before, self._step_stream)
            self._step_stream = None
