import json
from dataclasses import fields
from pathlib import Path

import pytest

from helpers import REPO
from qwen_moe_ft.config import (DEFAULT_DS_CONFIG, OTHER_NAMES, REAL_MODEL, RECIPES, TINY_MODEL, ConfigError,
                                TrainConfig, load_config)
from qwen_moe_ft.parallel.ds_config import build_ds_config
from qwen_moe_ft.parallel.expert_parallel import choose_ep_size


def test_cli_overrides_recipe_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.5\nepochs: 3\npacking: false\n")
    cfg = load_config(["--config", str(recipe), "--lr", "0.25", "--packing"])
    assert cfg.lr == 0.25 and cfg.epochs == 3.0 and cfg.packing is True
    assert cfg.grad_accum == TrainConfig().grad_accum


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(["--config", str(recipe)])


@pytest.mark.parametrize("argv, option", [
    (["--attn", "xformers"], "--attn"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--max-tokens-per-batch", "100", "--max-seq-len", "200"], "--max-tokens-per-batch"),
    (["--num-hidden-layers", "2"], "--num-hidden-layers"),
    (["--eval-split", "1.5"], "--eval-split"),
    (["--checkpoint-layers", "-1", "--activation-checkpointing", "true"], "--checkpoint-layers: must not be negative"),
    (["--checkpoint-layers", "2"], "--checkpoint-layers: chooses how many layers --activation-checkpointing"),
])
def test_bad_options_name_the_option(argv, option):
    with pytest.raises(ConfigError, match=option):
        load_config(argv).validate()


def test_bad_type_names_the_option():
    with pytest.raises(ConfigError, match="--lr: expected float"):
        load_config(["--lr", "fast"])


def test_default_model_follows_the_machine():
    assert TrainConfig().resolved_model(has_gpu=False) == TINY_MODEL
    assert TrainConfig().resolved_model(has_gpu=True) == REAL_MODEL
    assert TrainConfig(model="x/y").resolved_model(has_gpu=True) == "x/y"


def test_ep_size_auto_is_largest_common_divisor():
    assert choose_ep_size(0, 8, 128) == 8
    assert choose_ep_size(0, 6, 128) == 2
    assert choose_ep_size(0, 2, 8) == 2
    assert choose_ep_size(0, 1, 8) == 1


@pytest.mark.parametrize("ep, world, experts, what", [(3, 8, 128, "world size"), (4, 4, 6, "experts")])
def test_impossible_ep_size_is_an_error(ep, world, experts, what):
    with pytest.raises(ConfigError, match=f"--ep-size {ep}.*{what}"):
        choose_ep_size(ep, world, experts)


def test_ds_config_carries_the_run():
    cfg = TrainConfig(grad_accum=4, grad_clip=0.5, lr=2e-5, dtype="bf16")
    ds = build_ds_config(cfg, ep_size=8, world_size=8)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["expert_parallel"] == {"preset_model": "qwen3_moe", "enabled": True, "autoep_size": 8,
                                     "gate_up_impl": "fused", "combine_impl": "fused_weighted_sum"}
    on_cpu = build_ds_config(cfg, ep_size=8, world_size=8, device_type="cpu")
    assert on_cpu["expert_parallel"]["combine_impl"] == "weighted_sum"
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_allreduce_op"] == "sum"  # loss.backward_scale relies on it
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 2e-5
    assert ds["bf16"]["enabled"] is True
    assert build_ds_config(TrainConfig(dtype="fp32"), 1, 1)["bf16"]["enabled"] is False


def test_every_option_has_a_one_line_help():
    for field in fields(TrainConfig):
        assert field.metadata.get("help") and "\n" not in field.metadata["help"], field.name


@pytest.mark.parametrize("argv, message", [
    (["--learning-rate", "1"], "unknown option --learning-rate; did you mean --lr?"),
    (["--max-seq-length=3"], "unknown option --max-seq-length; did you mean --max-seq-len?"),
    (["--warmpu-steps", "3"], "did you mean --warmup-steps?"),
    (["--lerning-rate", "1"], "unknown option --lerning-rate; did you mean --lr?"),  # a typo of another trainer's
    (["--num-train-epochs", "1"], "did you mean --epochs?"),
    (["--per-device-train-batch-size", "8"], "did you mean --max-tokens-per-batch (a micro-batch's tokens per GPU, "
     "not rows)?"),
    (["--gradient-checkpointing"], "did you mean --activation-checkpointing true?"),
    (["--bf16", "true"], "did you mean --dtype bf16?"),
    (["--lr"], "argument --lr: expected one argument"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_command_line_errors_are_one_line_with_a_suggestion(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_recipe_syntax_error_and_unknown_key_are_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.1\nepochs: [3\n")
    with pytest.raises(ConfigError, match=r"r.yaml: not valid YAML .* line 3"):
        load_config(["--config", str(recipe)])
    recipe.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option learning_rate; did you mean --lr"):
        load_config(["--config", str(recipe)])
    recipe.write_text("lerning_rate: 0.1\nper_device_train_batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"unknown option lerning_rate; did you mean --lr\? \(and "
                       r"per_device_train_batch_size\)"):
        load_config(["--config", str(recipe)])


def test_other_trainers_names_point_at_options_that_exist():
    """Each suggestion for a transformers Trainer / TRL name loads as written, and no such name is one of ours."""
    ours = {f.name for f in fields(TrainConfig)}
    for name, suggestion in OTHER_NAMES.items():
        assert name not in ours, name
        flag, *value = suggestion.split(" (")[0].split()
        argv = [flag, *value] if value else [flag, str(getattr(TrainConfig(), flag[2:].replace("-", "_")))]
        load_config(argv).validate()


@pytest.mark.parametrize("recipe", sorted((REPO / "qwen_moe_ft" / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(["--config", str(recipe)]).validate()
    if recipe.stem == "qwen3-30b-a3b-lora-1gpu":  # what lets one GPU hold all 48 layers for LoRA
        assert cfg.lora and cfg.activation_checkpointing and cfg.ep_size == 1


def test_a_packaged_recipe_loads_by_name():
    assert load_config(["--config", "tiny-lora"]) == load_config(["--config", str(RECIPES / "tiny-lora.yaml")])
    with pytest.raises(ConfigError, match="tiny-lorra does not exist"):
        load_config(["--config", "tiny-lorra"])


def test_the_packaged_deepspeed_config_is_the_one_ds_configs_shows():
    """The default travels inside the package; ds_configs/zero2_ep.json is the copy a reader of the clone finds."""
    shown = REPO / "ds_configs" / "zero2_ep.json"
    assert json.loads(Path(DEFAULT_DS_CONFIG).read_text()) == json.loads(shown.read_text())
