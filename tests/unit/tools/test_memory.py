import pytest

from helpers import REPO
from qwen_moe_ft.config import QWEN3_30B_A3B
from qwen_moe_ft.config import TrainConfig
from qwen_moe_ft.tools.memory import (GIB, SUGGESTION_MARGIN_GIB, estimate, fewest_recomputed_layers,
                                     lora_parameter_counts, main, parameter_counts)
from qwen_moe_ft.model.loading import load_model_config


def qwen3(layers=0):
    return load_model_config(TrainConfig(random_init=bool(layers), num_hidden_layers=layers), QWEN3_30B_A3B)


def test_parameter_count_is_qwen3_30b_a3b():
    dense, expert = parameter_counts(qwen3())
    assert round((dense + expert) / 1e9, 1) == 30.5
    assert expert == 48 * 128 * 3 * 2048 * 768


@pytest.mark.parametrize("layers, adam_states, measured_gib",
                         [(2, "fp32", 42.2), (4, "fp32", 62.2), (2, "bf16", 35.2), (4, "bf16", 50.5)])
def test_estimate_within_ten_percent_of_the_h100_peaks(layers, adam_states, measured_gib):
    # Peaks measured by `python -m qwen_moe_ft.bench --full-length` on an H100 (docs/benchmark-history.md, commits
    # 760241f and 507b4c3): one GPU, 8192 tokens per step, plain torch loss.
    total = estimate(qwen3(layers), gpus=1, ep_size=1, tokens=8192, adam_states=adam_states).total / GIB
    assert total == pytest.approx(measured_gib, rel=0.10)


def test_expert_parallelism_shards_weights_and_zero2_states():
    one = estimate(qwen3(), gpus=8, ep_size=1, tokens=4096)
    eight = estimate(qwen3(), gpus=8, ep_size=8, tokens=4096)
    assert eight.weights < one.weights / 5
    assert eight.zero2_states == one.zero2_states


def test_bf16_adam_moments_make_room_for_twice_the_micro_batch(capsys):
    eight_gpus = ["--gpus", "8", "--ep-size", "8"]
    assert main([*eight_gpus, "--tokens", "4096", "--adam-states", "fp32"]) == 0
    assert main([*eight_gpus, "--tokens", "8192", "--adam-states", "fp32"]) == 1
    assert main([*eight_gpus, "--tokens", "8192"]) == 0
    assert main([*eight_gpus, "--tokens", "16384"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


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
        cfg = TrainConfig(lora=True, lora_targets=targets, lora_rank=4, dtype="fp32")
        model = AutoModelForCausalLM.from_pretrained(TINY)
        config = model.config
        model = apply_lora(model, cfg, build_ds_config(cfg, ep_size=1, world_size=1, device_type="cpu"), rank=0)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained == sum(lora_parameter_counts(config, 4, cfg.lora_target_list())), targets


@pytest.mark.parametrize("recomputed, fused_loss, measured_gib", [
    (48, False, 70.69), (39, False, 75.51), (0, False, 96.31), (30, True, 73.61), (34, True, 71.47), (39, True, 68.80)])
def test_lora_estimate_within_two_percent_of_the_h200_peaks(recomputed, fused_loss, measured_gib):
    # Peaks of `python -m qwen_moe_ft.bench --lora --layers 48 --tokens 4096 --lengths chat` with
    # --checkpoint-layers / --loss-impl liger on one H200 (BENCHMARKS.md, commit c15a292): rank 16, attn and experts.
    # The activation term per layer kept is fitted to their differences; what is tested is the rest, from the
    # shapes (57 GiB of weights, 6 GiB of the factors' states, 5.8 of logits, the recomputed layers' inputs):
    # measured -0.9% to +1.0%, where leaving out the weights, the states or the logits is more than 5%.
    total = estimate(qwen3(), gpus=1, ep_size=1, tokens=4096, fused_loss=fused_loss, lora_rank=16,
                     recomputed_layers=recomputed).total / GIB
    assert total == pytest.approx(measured_gib, rel=0.02)


def test_the_fewest_layers_to_recompute_is_the_edge_of_fitting(capsys):
    recipe = REPO / "qwen_moe_ft" / "recipes" / "qwen3-30b-a3b-lora-1gpu.yaml"
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "79.6"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 16 (attn,experts)" in out and "48 of 48 layers recomputed" in out
    setting = dict(config=qwen3(), gpus=1, ep_size=1, tokens=4096, lora_rank=16)
    budget = (79.6 - SUGGESTION_MARGIN_GIB) * GIB
    fewest = fewest_recomputed_layers(budget, **setting)
    assert 0 < fewest < 48 and f"--checkpoint-layers {fewest}\n" in out
    assert estimate(**setting, recomputed_layers=fewest).total <= budget < estimate(
        **setting, recomputed_layers=fewest - 1).total
    no_recompute = ["--activation-checkpointing", "false"]
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "79.6", *no_recompute]) == 1
    out = capsys.readouterr().out  # the recipe's setting overridden as train.py would take it
    assert "0 of 48 layers recomputed" in out and f"--checkpoint-layers {fewest}\n" in out
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "139"]) == 0
    assert "fits without activation checkpointing" in capsys.readouterr().out
    assert main(["--config", str(recipe), "--gpus", "1", "--gpu-gib", "40"]) == 1
    assert "recomputing every layer does not make it fit" in capsys.readouterr().out


def test_train_warns_before_loading_a_run_that_does_not_fit():
    from dataclasses import replace

    from qwen_moe_ft.config import load_config
    from qwen_moe_ft.tools.memory import preflight_warning

    recipe = load_config(["--config", str(REPO / "qwen_moe_ft" / "recipes" / "qwen3-30b-a3b-lora-1gpu.yaml")])
    assert preflight_warning(recipe, qwen3(), gpus=1, ep_size=1, gpu_gib=79.6) is None  # 70.6 GiB
    kept = replace(recipe, activation_checkpointing=False)
    assert preflight_warning(kept, qwen3(), gpus=1, ep_size=1, gpu_gib=139.0) is None  # 95.4 GiB
    warning = preflight_warning(kept, qwen3(), gpus=1, ep_size=1, gpu_gib=79.6)
    setting = dict(config=qwen3(), gpus=1, ep_size=1, tokens=4096, lora_rank=16)
    fewest = fewest_recomputed_layers((79.6 - SUGGESTION_MARGIN_GIB) * GIB, **setting)
    peak = estimate(**setting).total / GIB
    assert warning.startswith(f"the estimated peak memory of this run is {peak:.1f} GiB a GPU, more than this GPU's "
                              "79.6")
    assert warning.endswith(f"--activation-checkpointing true --checkpoint-layers {fewest}")
