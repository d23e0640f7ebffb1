import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers import REPO
from qwen_moe_ft.config import QWEN3_30B_A3B, ModelConfig, TrainConfig
from qwen_moe_ft.memory import (GIB, RunPlan, LORA_ACTIVATION_BYTES_PER_TOKEN_LAYER, LORA_BACKWARD_BYTES_PER_TOKEN_LAYER,
                                HEADROOM_GIB, MASTER_BYTES, Workload,
                                estimate, fewest_recomputed_layers, lora_parameter_counts, loss_bytes, main,
                                overlap_reserve_note,
                                parameter_counts)
from qwen_moe_ft.model.loading import load_model_config


def qwen3(layers=0):
    return load_model_config(ModelConfig(random_init=bool(layers), num_hidden_layers=layers), QWEN3_30B_A3B)


def workload(cfg, layers=48):
    return Workload.of(model=cfg.model, data=cfg.data, optim=cfg.optim, fastpath=cfg.fastpath, lora=cfg.lora,
                       layers=layers)


def test_workload_is_what_the_estimate_reads_of_the_config_sections():
    cfg = TrainConfig.from_flat(max_tokens_per_batch=2048, grad_accum=4, gate_up_recompute=True, adam_states="fp32",
                                loss_impl="chunked", activation_checkpointing=True, checkpoint_layers="3")
    assert workload(cfg) == Workload(tokens=2048, grad_accum=4, gate_up_recompute=True, adam_states="fp32",
                                     loss_impl="chunked", recomputed_layers=3)
    lora = workload(TrainConfig.from_flat(lora=True, lora_rank=4, lora_targets="experts"))
    assert (lora.lora_rank, lora.lora_targets, lora.recomputed_layers) == (4, ("experts",), 0)
    assert workload(TrainConfig.from_flat(activation_checkpointing=True), layers=4).recomputed_layers == 4


def test_masters_kept_as_low_bits_where_the_fast_path_keeps_them():
    assert workload(TrainConfig.from_flat()).masters == "low_bits"
    for off in (dict(fast_path_skip="master_low_bits"), dict(fast_path="off"), dict(dtype="fp32"), dict(lora=True)):
        assert workload(TrainConfig.from_flat(**off)).masters == "fp32", off
    fp32, low = (estimate(qwen3(), gpus=8, ep_size=8, tokens=4096, masters=kind) for kind in ("fp32", "low_bits"))
    dense, expert = parameter_counts(qwen3())
    assert fp32.zero2_states - low.zero2_states == 2 * (dense + expert) / 8  # 2 bytes a trained parameter
    assert fp32.total - low.total == 2 * (dense + expert) / 8
    lora = (estimate(qwen3(), gpus=8, ep_size=8, tokens=4096, lora_rank=16, masters=kind) for kind in MASTER_BYTES)
    assert len({e.total for e in lora}) == 1  # LoRA keeps fp32 masters
    assert workload(TrainConfig.from_flat(master_weights="bf16")).masters == "bf16"
    rounded = estimate(qwen3(), gpus=8, ep_size=8, tokens=4096, masters="bf16")
    assert fp32.zero2_states - rounded.zero2_states == 4 * (dense + expert) / 8  # no master kept beside the weight


def test_parameter_count_is_qwen3_30b_a3b():
    dense, expert = parameter_counts(qwen3())
    assert round((dense + expert) / 1e9, 1) == 30.5
    assert expert == 48 * 128 * 3 * 2048 * 768


@pytest.mark.parametrize("layers, adam_states, tokens, loss, rows_kept, measured_gib, masters", [
    (2, "fp32", 8192, "torch", True, 42.2, "fp32"), (4, "fp32", 8192, "torch", True, 62.2, "fp32"),
    (2, "bf16", 8192, "torch", True, 35.2, "fp32"), (4, "bf16", 8192, "torch", True, 50.5, "fp32"),
    (4, "bf16", 32768, "chunked", True, 52.53, "fp32"), (2, "bf16", 8192, "in_place", True, 24.215, "fp32"),
    (4, "bf16", 8192, "in_place", True, 39.579, "fp32"),
    (2, "bf16", 8192, "in_place", False, 23.715, "fp32"), (4, "bf16", 8192, "in_place", False, 38.578, "fp32"),
    (4, "bf16", 8192, "in_place", False, 32.78, "low_bits"), (2, "bf16", 8192, "in_place", False, 20.13, "low_bits"),
    (4, "bf16", 8192, "in_place", False, 33.24, "low_bits"), (2, "bf16", 8192, "in_place", False, 16.65, "bf16")])
def test_estimate_within_two_percent_of_the_measured_peaks(layers, adam_states, tokens, loss, rows_kept, measured_gib,
                                                           masters):
    # Peaks measured by `python -m qwen_moe_ft.bench --full-length` on an H100 (docs/benchmark-history.md, commits
    # 760241f and 507b4c3): one GPU, 8192 tokens per step, plain torch loss; and one 32768-token document with the
    # loss in chunks (BENCHMARKS.md "Memory", commit 7bc53a0), whose allocations at the peak fixed the activations'
    # size; with the Triton loss on the bf16 logits (b7aeec9). All at the loss's peak: the activations and the loss's
    # backward, the gradients not yet allocated. Those runs kept the experts' output rows for AutoEP's weighted
    # combine, as expert parallelism still does (rows_kept); the last two ran 82ef120 with the scored combine of
    # 232ce6a, where EP=1 applies the scores in the experts and keeps none: 0.500 / 1.001 GiB below the two before.
    # Then with the masters as low bits (559b94d, an H200, the same bench): 5.80 GiB below the one before it; on an
    # H100 at 53f2b3e with quack, flash-attn 4 and liger at 2 and 4 layers, and --master-weights bf16 (the weights
    # alone as the masters) at 2 layers: 3.48 GiB less, as estimated. Its 4-layer peak, 27.44 GiB, is 2.1% above the
    # estimate (33.24 is 1.7%): that stack's layers grow 0.28 GiB a layer more than the estimate's, not yet traced.
    total = estimate(qwen3(layers), gpus=1, ep_size=1, tokens=tokens, adam_states=adam_states, loss=loss,
                     expert_output_rows=rows_kept, masters=masters).total / GIB
    assert total == pytest.approx(measured_gib, rel=0.02)


def test_the_experts_output_rows_are_kept_with_expert_parallelism_only():
    config = qwen3(4)
    one_rank = estimate(config, gpus=1, ep_size=1, tokens=8192)
    kept = estimate(config, gpus=1, ep_size=1, tokens=8192, expert_output_rows=True)
    rows = 8192 * 4 * config.num_experts_per_tok * config.hidden_size * 2  # bf16 rows, top_k a token, 4 layers
    assert kept.activations - one_rank.activations == rows
    assert estimate(config, gpus=8, ep_size=8, tokens=8192).activations == kept.activations
    assert estimate(config, gpus=8, ep_size=8, tokens=8192, lora_rank=16).activations == \
        estimate(config, gpus=8, ep_size=1, tokens=8192, lora_rank=16).activations  # LoRA's rows: its own count


def test_expert_parallelism_shards_weights_and_zero2_states():
    one = estimate(qwen3(), gpus=8, ep_size=1, tokens=4096)
    eight = estimate(qwen3(), gpus=8, ep_size=8, tokens=4096)
    assert eight.weights < one.weights / 5
    assert eight.zero2_states == one.zero2_states


def test_bf16_adam_moments_make_room_for_twice_the_micro_batch(capsys):
    eight_gpus = ["--gpus", "8", "--ep-size", "8", "--loss-impl", "torch", "--activation-checkpointing", "true"]
    assert main([*eight_gpus, "--tokens", "8192", "--adam-states", "fp32"]) == 0
    assert main([*eight_gpus, "--tokens", "16384", "--adam-states", "fp32"]) == 1
    assert main([*eight_gpus, "--tokens", "16384"]) == 0
    assert main([*eight_gpus, "--tokens", "32768"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    # --loss-impl auto: above 8192 tokens the loss in chunks, which makes room
    assert main([*eight_gpus, "--tokens", "16384", "--adam-states", "fp32", "--loss-impl", "auto"]) == 0
    assert "loss chunked (auto: 16384 tokens a micro-batch, more than 8192)" in capsys.readouterr().out


def test_the_allocators_reserve_under_step_overlap_is_told_where_it_runs(capsys):
    main(["--gpus", "8", "--ep-size", "8"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step_overlap"))
    skip = TrainConfig.from_flat().fastpath.skip
    assert f"--fast-path-skip {skip},step_overlap gives" in line
    main(["--gpus", "8", "--ep-size", "8", "--lora", "true"])
    assert "step_overlap (" not in capsys.readouterr().out
    for off in (dict(fast_path="off"), dict(lora=True), dict(fast_path_skip="step_overlap")):
        cfg = TrainConfig.from_flat(**off)
        assert overlap_reserve_note(cfg.fastpath, cfg.lora) is None, off


def test_accumulation_adds_the_gradient_partition_measured_on_the_h100():
    # train.py on an H100 80GB, 4 layers, 8192-token micro-batches: 62.61 GiB peak with one micro-batch per
    # step, 68.41 with two (docs/benchmark-history.md, commit b068461).
    one, two = (estimate(qwen3(4), gpus=1, ep_size=1, tokens=8192, grad_accum=ga, adam_states="fp32").total / GIB
                for ga in (1, 2))
    assert two - one == pytest.approx(68.41 - 62.61, rel=0.10)


@pytest.mark.parametrize("mode", ["packed", "unpacked"])
def test_qwen3_30b_a3b_recipes_fit_8_x_80gb(mode, capsys):
    recipe = REPO / "qwen_moe_ft" / "recipes" / f"qwen3-30b-a3b-{mode}.yaml"
    assert main(["--config", str(recipe), "--gpus", "8"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "-5"], "argument --tokens: at least 1, got -5"),
    (["--gpus", "0"], "argument --gpus: at least 1, got 0"),
    (["--gpu-gib", "0"], "argument --gpu-gib: more than 0, got 0.0"),
    (["--checkpoint-layers", "foo"], "--checkpoint-layers: got 'foo'; use all, auto or a number of layers"),
    (["--gpus", "8", "--ep-size", "3"], "--ep-size 3 does not divide the world size 8"),
    (["--model", "./no-such-model"], "./no-such-model: no such directory"),
])
def test_bad_options_are_one_line_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_recipes_model_is_the_one_estimated(capsys):
    """The tiny recipe's model, not Qwen3-30B-A3B; the 30B recipes' hub model is the config shipped with the
    package."""
    main(["--config", "tiny-packed", "--gpus", "1"])
    assert capsys.readouterr().out.startswith("data/tiny-qwen3-moe: 2 layers")
    main(["--config", "qwen3-30b-a3b-packed", "--gpus", "8"])
    assert capsys.readouterr().out.startswith(f"{QWEN3_30B_A3B}: 48 layers")


def test_gpus_and_their_memory_default_to_the_machine(monkeypatch, capsys):
    import torch
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=140 * GIB))
    recipe = REPO / "qwen_moe_ft" / "recipes" / "qwen3-30b-a3b-packed.yaml"
    main(["--config", str(recipe)])
    out = capsys.readouterr().out
    assert "4 GPUs (this machine's), EP=4" in out and "a 140.0 GiB GPU" in out
    main(["--config", str(recipe), "--gpus", "2", "--gpu-gib", "80"])
    out = capsys.readouterr().out
    assert "2 GPUs, EP=2" in out and "a 80.0 GiB GPU" in out


@pytest.mark.parametrize("mode", ["packed", "unpacked", "lora"])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_qwen3_30b_a3b_recipes_choose_the_ep_size_of_any_gpu_count(mode, gpus, capsys):
    recipe = REPO / "qwen_moe_ft" / "recipes" / f"qwen3-30b-a3b-{mode}.yaml"
    main(["--config", str(recipe), "--gpus", str(gpus)])  # fits or not: no EP-size error either way
    assert f"{gpus} GPUs, EP={gpus}," in capsys.readouterr().out


def test_lora_parameter_count_is_what_apply_lora_trains(process_group):
    from transformers import AutoModelForCausalLM

    from helpers import TINY
    from qwen_moe_ft.model.lora import apply_lora
    from qwen_moe_ft.parallel.ds_config import build_ds_config

    for targets in ("attn,experts", "experts"):
        cfg = TrainConfig.from_flat(lora=True, lora_targets=targets, lora_rank=4, dtype="fp32")
        model = AutoModelForCausalLM.from_pretrained(TINY)
        config = model.config
        ds_config = build_ds_config(ep_size=1, world_size=1, device_type="cpu", dtype=cfg.model.dtype)
        model = apply_lora(model, cfg.lora, ds_config, rank=0, seed=cfg.optim.seed)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained == sum(lora_parameter_counts(config, 4, cfg.lora.target_list())), targets


@pytest.mark.parametrize("gpu, recomputed, loss, measured_gib", [
    ("H200", 16, "chunked", 76.715), ("H200", 28, "chunked", 72.189), ("H200", 0, "torch", 88.793),
    ("H100", 22, "chunked", 74.452), ("H100", 22, "in_place", 74.901)])
def test_lora_estimate_within_two_percent_of_the_measured_peaks(gpu, recomputed, loss, measured_gib):
    # `python -m qwen_moe_ft.bench --lora --layers 48 --tokens 4096 --lengths chat [--checkpoint-layers N --loss-impl
    # chunked]`: rank 16 on attention and experts (BENCHMARKS.md "Memory"; H200 at 9c19195, the H100 80GB's auto
    # choice at 2292216, and at b7aeec9 with the Triton loss, "in_place"). The activation term per layer kept is
    # fitted to the first two's difference; what is tested is the rest, from the shapes (58 GiB of weights, 4.8 GiB of
    # the factors' states, the logits, the recomputed layers' inputs): measured -1.0% to -0.7%, where leaving out the
    # states or the plain loss's logits is 6% or more.
    total = estimate(qwen3(), gpus=1, ep_size=1, tokens=4096, loss=loss, lora_rank=16,
                     recomputed_layers=recomputed).total / GIB
    assert total == pytest.approx(measured_gib, rel=0.02)
    assert 4096 * LORA_ACTIVATION_BYTES_PER_TOKEN_LAYER / GIB == pytest.approx((76.715 - 72.189) / 12, rel=0.01)


def test_the_fewest_layers_to_recompute_is_the_edge_of_fitting(capsys):
    recipe = REPO / "qwen_moe_ft" / "recipes" / "qwen3-30b-a3b-lora-1gpu.yaml"
    every = ["--checkpoint-layers", "all"]
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "79.6", *every]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 16 (attn,experts)" in out and "48 of 48 layers recomputed" in out
    # the CLI plans for a GPU, where auto's loss on the whole logits is the Triton one (2 bytes a logit)
    setting = dict(config=qwen3(), gpus=1, ep_size=1, tokens=4096, lora_rank=16, loss="in_place")
    budget = (79.6 - HEADROOM_GIB) * GIB
    fewest = fewest_recomputed_layers(budget, **setting)
    assert 0 < fewest < 48 and f"--checkpoint-layers {fewest} (or auto)\n" in out
    assert estimate(**setting, recomputed_layers=fewest).total <= budget < estimate(
        **setting, recomputed_layers=fewest - 1).total
    # the recipe's checkpoint_layers (auto) replaced too: train.py refuses a count of layers without recompute
    no_recompute = ["--activation-checkpointing", "false", "--checkpoint-layers", "all"]
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "79.6", *no_recompute]) == 1
    out = capsys.readouterr().out  # the recipe's setting overridden as train.py would take it
    # without the logits: that run (and the suggested one) computes the loss in chunks
    fewest_chunked = fewest_recomputed_layers(budget, **{**setting, "loss": "chunked"})
    assert fewest_chunked <= fewest
    assert "0 of 48 layers recomputed, loss chunked (auto: the estimated peak with the logits exceeds the GPU)" in out
    assert f"--checkpoint-layers {fewest_chunked} (or auto)\n" in out
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "139", *every]) == 0
    assert "fits without activation checkpointing" in capsys.readouterr().out
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "40", *every]) == 1
    assert "recomputing every layer does not make it fit" in capsys.readouterr().out


def test_checkpoint_layers_auto_recomputes_the_fewest_that_leave_the_headroom(capsys):
    from dataclasses import replace

    from qwen_moe_ft.config import load_config
    from qwen_moe_ft.memory import plan_run

    recipe = load_config(["--config", "qwen3-30b-a3b-lora-1gpu"])
    assert recipe.model.checkpoint_layers == "auto" and recipe.model.loss_impl == "auto"
    work = workload(recipe)
    assert work == Workload(tokens=4096, lora_rank=16, loss_impl="auto", recomputed_layers=None,
                             masters="fp32")  # LoRA keeps fp32 masters
    setting = dict(config=qwen3(), gpus=1, ep_size=1, tokens=4096, lora_rank=16)
    budget = (79.6 - HEADROOM_GIB) * GIB
    plan = plan_run(work, qwen3(), gpus=1, ep_size=1, gpu_gib=79.6)
    # the whole logits (5.8 GiB) would cost ~11 kept layers: auto takes the chunked loss and keeps them
    with_logits = fewest_recomputed_layers(budget, **setting, loss="torch")
    assert plan.loss == "chunked" and plan.recomputed_layers == fewest_recomputed_layers(budget, **setting,
                                                                                         loss="chunked")
    assert 0 < plan.recomputed_layers < with_logits - 8
    assert estimate(**setting, loss="chunked", recomputed_layers=plan.recomputed_layers).total <= budget
    # on a GPU (the CLI's plan) the Triton loss's logits cost about what the chunks do: auto keeps the whole logits
    on_gpu = plan_run(work, qwen3(), gpus=1, ep_size=1, gpu_gib=79.6, whole_loss="triton")
    assert on_gpu == RunPlan("triton", "", fewest_recomputed_layers(budget, **setting, loss="in_place"))
    assert abs(on_gpu.recomputed_layers - plan.recomputed_layers) < 8
    assert main(["--config", "qwen3-30b-a3b-lora-1gpu", "--gpus", "1", "--gpu-gib", "79.6"]) == 0
    assert f"{on_gpu.recomputed_layers} of 48 layers recomputed, loss triton\n" in capsys.readouterr().out
    # a loss the user names is kept, and auto fits the layers around it
    plain = replace(work, loss_impl="torch")
    assert plan_run(plain, qwen3(), gpus=1, ep_size=1, gpu_gib=79.6).recomputed_layers == with_logits
    # a GPU that holds every layer with the logits recomputes none; one that holds nothing recomputes all
    assert plan_run(work, qwen3(), gpus=1, ep_size=1, gpu_gib=139.0) == RunPlan("torch", "", 0)
    assert plan_run(work, qwen3(), gpus=1, ep_size=1, gpu_gib=40.0).recomputed_layers == 48


def test_auto_takes_the_chunked_loss_only_for_several_more_layers_kept():
    # The 8 x 80 GB full fine-tuning recipe (EP=8, 8192 tokens): with torch's loss (12 bytes a logit) the chunks keep
    # 11 more layers and auto takes them; with the Triton loss (2 bytes a logit, where triton is installed) they would
    # keep one more layer, for ~33 ms more a micro-batch than recomputing it costs, so auto keeps the whole logits.
    from qwen_moe_ft.config import load_config
    from qwen_moe_ft.memory import CHUNKED_LOSS_MIN_KEPT_LAYERS, plan_run

    work = workload(load_config(["--config", str(REPO / "qwen_moe_ft" / "recipes" / "qwen3-30b-a3b-packed.yaml")]))
    run = dict(gpus=8, ep_size=8, gpu_gib=79.2)
    for whole in ("torch", "triton"):
        budget = (79.2 - HEADROOM_GIB) * GIB
        layers = {loss: fewest_recomputed_layers(budget, **work.setting(qwen3(), gpus=8, ep_size=8, loss=loss))
                  for loss in (whole, "chunked")}
        kept = layers[whole] - layers["chunked"]
        plan = plan_run(work, qwen3(), **run, whole_loss=whole)
        if whole == "torch":
            assert kept >= CHUNKED_LOSS_MIN_KEPT_LAYERS and plan.loss == "chunked"
        else:
            assert 0 < kept < CHUNKED_LOSS_MIN_KEPT_LAYERS and plan == RunPlan("triton", "", layers["triton"])


def test_train_warns_before_loading_a_run_that_does_not_fit():
    from dataclasses import replace

    from qwen_moe_ft.config import load_config
    from qwen_moe_ft.memory import preflight_warning

    recipe = workload(load_config(["--config", "qwen3-30b-a3b-lora-1gpu"]))
    assert preflight_warning(recipe, qwen3(), gpus=1, ep_size=1, gpu_gib=79.6) is None  # 70.6 GiB
    kept = replace(recipe, recomputed_layers=0)
    assert preflight_warning(kept, qwen3(), gpus=1, ep_size=1, gpu_gib=139.0) is None  # 95.4 GiB
    warning = preflight_warning(kept, qwen3(), gpus=1, ep_size=1, gpu_gib=79.6)
    # the logits do not fit either: --loss-impl auto computes the loss in chunks, and the warning counts that
    setting = dict(config=qwen3(), gpus=1, ep_size=1, tokens=4096, lora_rank=16, loss="chunked")
    fewest = fewest_recomputed_layers((79.6 - HEADROOM_GIB) * GIB, **setting)
    peak = estimate(**setting).total / GIB
    assert warning.startswith(f"the estimated peak memory of this run is {peak:.1f} GiB a GPU, more than this GPU's "
                              "79.6")
    assert warning.endswith(f"--activation-checkpointing true --checkpoint-layers {fewest} (or auto)")


class LiveStorage(TorchDispatchMode):
    """The most bytes of tensor storage allocated under it and alive at once: every op's new outputs counted until
    freed (CPU tensors: the count the GPU's allocator would see, without its rounding)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _freed(self, key: int, nbytes: int):
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: not a new allocation
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and (storage := tensor.untyped_storage()).data_ptr() not in (
                    self.seen | inputs):
                key, nbytes = storage.data_ptr(), storage.nbytes()
                self.seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, nbytes)
        return out


@pytest.mark.parametrize("tokens, hidden, vocab", [(4096, 64, 8192), (256, 1024, 4096)])
@pytest.mark.parametrize("lm_head_trains", [True, False])
def test_the_chunked_loss_term_is_what_the_chunked_loss_allocates(tokens, hidden, vocab, lm_head_trains):
    # Its forward and backward in bf16, counted op by op: at 4096 tokens the peak is a chunk's bf16 logits beside
    # their fp32 copy; with a wide hidden size and a trained LM head, a chunk's bf16 gradient beside its product
    # for the weight's gradient. The rest is the few [chunk]-long rows of the softmax: within 1%.
    from qwen_moe_ft.loss import chunked_linear_ce_sum

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).bfloat16().requires_grad_(lm_head_trains)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    with LiveStorage() as meter:
        chunked_linear_ce_sum(h, w, labels).backward()
    config = SimpleNamespace(vocab_size=vocab, hidden_size=hidden)
    assert meter.peak == pytest.approx(loss_bytes(config, "chunked", tokens, lm_head_trains), rel=0.01)
    # the plain path's logits, against which the chunked path is chosen: more than tokens x vocab x 10 bytes
    with LiveStorage() as meter:
        F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum").backward()
    assert meter.peak >= loss_bytes(config, "torch", tokens, lm_head_trains)


def test_a_32k_token_document_computes_the_loss_in_chunks(capsys):
    # 4 layers of full fine-tuning, one 32768-token micro-batch on an 80 GB GPU: the plain loss's backward alone holds
    # 56 GiB (three fp32 tensors of 32768 x 151936), the chunked loss 2.2 GiB (one chunk's logits, the hidden
    # states' gradient, the LM head's fp32 gradient sum)
    one_gpu = ["--layers", "4", "--gpus", "1", "--gpu-gib", "79.6", "--tokens", "32768"]
    assert main(one_gpu) == 0
    out = capsys.readouterr().out
    assert "loss chunked (auto: 32768 tokens a micro-batch, more than 8192)" in out
    assert main([*one_gpu, "--loss-impl", "torch"]) == 1
    plain, chunked = (estimate(qwen3(4), gpus=1, ep_size=1, tokens=32768, loss=loss) for loss in ("torch", "chunked"))
    assert plain.logits / GIB == pytest.approx(55.6, abs=0.05) and chunked.logits / GIB == pytest.approx(2.15, abs=0.01)


def test_with_every_layer_recomputed_at_32k_tokens_the_peak_is_a_recomputed_layers_backward():
    # 48-layer LoRA at 32768 tokens, chunked loss: one layer's activations and its backward's own tensors (179.5 KiB
    # a token: 5.6 GiB) outweigh the loss's 1 GiB, so the backward of the last recomputed layer, holding every layer's
    # input, its own activations and the gradients, passes the loss's peak; with layers kept, the peak is back at the
    # loss.
    setting = dict(config=qwen3(), gpus=1, ep_size=1, tokens=32768, lora_rank=16, loss="chunked")
    every = estimate(**setting, recomputed_layers=48)
    inputs = 48 * 2 * 2048 * 32768  # bf16 inputs
    layer = 32768 * (LORA_ACTIVATION_BYTES_PER_TOKEN_LAYER + LORA_BACKWARD_BYTES_PER_TOKEN_LAYER)
    assert every.activations == inputs and every.recompute == inputs + layer
    assert every.peak_at == "a recomputed layer's backward"
    assert every.total == every.weights + every.zero2_states + every.gradients + inputs + layer
    assert estimate(**setting, recomputed_layers=40).peak_at == "the loss"
    # measured 75.66 GiB (H100 80GB, commit 2292216, BENCHMARKS.md), the backward's term fitted to it
    assert every.total / GIB == pytest.approx(75.66, rel=0.01)
    assert estimate(**{**setting, "loss": "torch"}, recomputed_layers=48).total / GIB > 79.6
