"""The fast path's one entry point on DeepSpeed's real ZeRO-2 engine (one CPU rank): what it installs, in
which order, what it refuses and why; the version guard; `import qwen_moe_ft.train` imports no patch."""
import subprocess
import sys
import warnings

import pytest
import torch

from helpers import REPO, autoep_engine, cpu_env
from qwen_moe_ft.config import ConfigError
from qwen_moe_ft.fastpath import FastPath, versions


# what these two assert is refused runs on a GPU with quack-kernels
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusals of a machine without a GPU")


@CPU_ONLY
def test_install_applies_every_patch_in_order_and_names_them(process_group):
    engine = autoep_engine()
    fast_path = FastPath()
    model, kernels = fast_path.prepare_model(engine.module, "auto", "cpu")
    assert kernels == "none"  # no GPU: liger is refused with the reason
    applied = fast_path.install(engine, adam_states="bf16")
    assert [a.name for a in applied] == ["liger_norm_rope", "one_pass_grad_norm", "grads_in_place", "one_pass_adamw",
                                         "master_low_bits", "step_overlap", "layout_preserving_gate_up",
                                         "gate_up_cache", "one_rank_dispatch", "quack_experts", "scored_swiglu",
                                         "lean_topk_router", "fused_attention_inputs"]
    # no GPU, no quack here
    assert [a.name for a in applied if not a] == ["liger_norm_rope", "step_overlap", "quack_experts",
                                                  "fused_attention_inputs"]
    assert fast_path.adam_states == "bf16"
    summary = fast_path.summary()
    assert summary.startswith("fast path: one_pass_grad_norm, grads_in_place, one_pass_adamw, master_low_bits")
    assert "refused: liger_norm_rope (refused: --fused-kernels none)" in summary
    assert type(engine.optimizer.optimizer).__name__ == "MasterAdamW"
    assert not any(name.startswith(("qmf", "_qmf")) for name in vars(engine.optimizer))  # state is ours


def test_bf16_master_weights_take_the_place_of_the_low_bits(process_group):
    fast_path = FastPath()
    applied = fast_path.install(autoep_engine(), master_weights="bf16")
    names = [a.name for a in applied]
    assert "bf16_master_weights" in names and "master_low_bits" not in names
    assert applied[names.index("bf16_master_weights")]
    assert type(fast_path._zero_state.master_bits).__name__ == "RoundedMasters"


def test_bf16_master_weights_where_they_cannot_be_kept_stop_the_run(process_group):
    with pytest.raises(ConfigError, match=r"--master-weights bf16: torch.float32 weights; use --master-weights fp32"):
        FastPath().install(autoep_engine(torch.float32), master_weights="bf16")
    with pytest.raises(ConfigError, match=r"--master-weights bf16: the fast path is off \(--fast-path off\)"):
        FastPath(enabled=False).install(None, master_weights="bf16")


@CPU_ONLY
def test_quack_experts_asked_for_where_they_cannot_run_stop_the_run(process_group):
    with pytest.raises(ConfigError, match=r"--expert-kernels quack: .*use --expert-kernels auto or torch"):
        FastPath().install(autoep_engine(), expert_kernels="quack")


def _failing_quack_chain(monkeypatch):
    """quack's version and GPU suit, but its chain raises what quack-kernels 0.6.5 raised on an install it could not
    fingerprint (nvidia-cutlass-dsl 4.8.1 outside site-packages)."""
    from qwen_moe_ft.fastpath import quack_experts

    def chain(*args, **kwargs):
        raise TypeError("epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS'>, which has no fail-closed "
                        "semantic key.\n  more")

    monkeypatch.setattr(quack_experts, "unavailable_because", lambda device, activation: "")
    monkeypatch.setattr(quack_experts, "gathered_swiglu_experts", chain)


def test_auto_keeps_torch_experts_where_quack_fails_its_probe(process_group, monkeypatch):
    _failing_quack_chain(monkeypatch)
    engine = autoep_engine()
    fast_path = FastPath()
    applied = {a.name: a for a in fast_path.install(engine, expert_kernels="auto")}
    assert applied["quack_experts"].refused == ("a small call of quack's expert kernels failed: TypeError: epilogue "
                                                "fn depends on <ContextVar name='_LOC_TRANSFORMS'>, which has no "
                                                "fail-closed semantic key.")
    assert "quack_experts (refused: a small call of quack's expert kernels failed: TypeError" in fast_path.summary()
    assert applied["one_rank_dispatch"]
    out = engine(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    out.loss.backward()  # the experts run torch's chain: the failing one is never called again
    assert torch.isfinite(out.loss)


def test_quack_asked_for_where_it_fails_its_probe_stops_the_run(process_group, monkeypatch):
    _failing_quack_chain(monkeypatch)
    with pytest.raises(ConfigError, match=r"--expert-kernels quack: a small call of quack's expert kernels failed: "
                                          r"TypeError: epilogue fn"):
        FastPath().install(autoep_engine(), expert_kernels="quack")


def test_skipped_quack_experts_are_refused_for_auto_and_contradict_quack(process_group):
    with pytest.raises(ConfigError, match="--expert-kernels quack with quack_experts in --fast-path-skip: choose one"):
        FastPath(skip="quack_experts").install(autoep_engine(), expert_kernels="quack")
    applied = {a.name: a for a in FastPath(skip="quack_experts").install(autoep_engine(), expert_kernels="auto")}
    assert applied["quack_experts"].refused == "--fast-path-skip"
    assert "quack_experts" not in {a.name for a in FastPath().install(autoep_engine(), expert_kernels="torch")}


@CPU_ONLY
def test_skipped_patches_are_refused_by_name_and_not_installed(process_group):
    engine = autoep_engine()
    fast_path = FastPath(skip="scored_swiglu,lean_topk_router")
    applied = {a.name: a for a in fast_path.install(engine)}
    assert applied["scored_swiglu"].refused == applied["lean_topk_router"].refused == "--fast-path-skip"
    assert applied["one_rank_dispatch"]
    from qwen_moe_ft.fastpath.local_dispatch import dispatch_options

    layers = [m for m in engine.module.modules() if "_forward" in vars(m)]
    assert layers and all(dispatch_options(m).get("scored") is False for m in layers)
    assert not any("forward" in vars(m.router) for m in layers)  # the routers keep DeepSpeed's forward
    scored = FastPath()
    assert {a.name: a for a in scored.install(autoep_engine())}["scored_swiglu"]


def test_only_the_skippable_patches_can_be_left_out():
    with pytest.raises(ConfigError, match=r"--fast-path-skip: one_pass_adamw cannot be left out; the patches that "
                                          r"can: triton_hidden_norms, .*fused_attention_inputs"):
        FastPath(skip="one_pass_adamw")
    assert FastPath(skip=", fused_attention_inputs ").skip == ("fused_attention_inputs",)


def test_recompute_refuses_the_cache_and_says_why(process_group):
    fast_path = FastPath()
    applied = {a.name: a for a in fast_path.install(autoep_engine(), gate_up_recompute=True)}
    assert applied["layout_preserving_gate_up"] and not applied["gate_up_cache"]
    assert "--gate-up-recompute" in applied["gate_up_cache"].refused


def test_other_versions_install_nothing_with_one_warning(process_group, monkeypatch):
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda p: "0.20.0" if p == "deepspeed" else real(p))
    with pytest.warns(UserWarning, match=r"deepspeed 0\.20\.0 \(written for 0\.19\.8\).*stock DeepSpeed"):
        fast_path = FastPath()
    engine = autoep_engine()
    step = engine.optimizer.step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast_path.install(engine) == []
        assert fast_path.prepare_model(engine.module, "auto", "cpu")[1] == "none"
    assert engine.optimizer.step == step and fast_path.adam_states == "fp32"
    assert fast_path.summary().startswith("fast path off (written for other versions: deepspeed 0.20.0")


def test_importing_the_trainer_imports_no_patch():
    """The trainer holds a FastPath, on or off; only FastPath and what it needs before the version guard load."""
    code = ("import sys, qwen_moe_ft.train; "
            "print(sorted(m for m in sys.modules if m.startswith('qwen_moe_ft.fastpath')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(["qwen_moe_ft.fastpath", "qwen_moe_ft.fastpath.applied",
                                                        "qwen_moe_ft.fastpath.versions"])


def test_off_does_nothing():
    fast_path, model = FastPath(enabled=False), torch.nn.Linear(2, 2)
    assert fast_path.prepare_model(model, "auto", "cpu") == (model, "none")
    assert fast_path.install(engine=None) == []
    fast_path.after_load()
    fast_path.restore()
    assert fast_path.adam_states == "fp32" and fast_path.summary() == "fast path off (--fast-path off)"
