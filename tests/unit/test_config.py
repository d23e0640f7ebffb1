import json
from pathlib import Path

import pytest

from helpers import REPO
from qwen_moe_ft.config import (DEFAULT_DS_CONFIG, OPTIONS, OTHER_NAMES, REAL_MODEL, RECIPES, TINY_MODEL, ConfigError,
                                OptimConfig, TrainConfig, build_parser, load_config)
from qwen_moe_ft.parallel.ds_config import build_ds_config


def test_cli_overrides_recipe_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.5\nepochs: 3\npacking: false\n")
    cfg = load_config(["--config", str(recipe), "--lr", "0.25", "--packing"])
    assert cfg.optim.lr == 0.25 and cfg.optim.epochs == 3.0 and cfg.data.packing is True
    assert cfg.optim.grad_accum == OptimConfig().grad_accum


def test_flat_names_reach_their_sections():
    cfg = TrainConfig.from_flat(lr=0.5, model="x/y", data="rows.jsonl", lora=True, lora_rank=4, fast_path="off",
                                router_aux_loss_coef=0.01, output_dir="out", save_steps=5)
    assert (cfg.optim.lr, cfg.model.name, cfg.data.source, cfg.lora.enabled, cfg.lora.rank) == (
        0.5, "x/y", "rows.jsonl", True, 4)
    assert (cfg.fastpath.mode, cfg.router.aux_loss_coef, cfg.output.dir, cfg.checkpoint.save_steps) == (
        "off", 0.01, "out", 5)
    assert TrainConfig.from_flat(**cfg.flat()) == cfg
    assert load_config(["--lr", "0.5", "--lora", "--fast-path", "off"]) == TrainConfig.from_flat(
        lr=0.5, lora=True, fast_path="off")
    with pytest.raises(TypeError, match="learning_rate"):
        TrainConfig.from_flat(learning_rate=0.1)


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
    (["--checkpoint-layers", "-1", "--activation-checkpointing", "true"], "--checkpoint-layers: got '-1'; use all, auto"),
        (["--checkpoint-layers", "half", "--activation-checkpointing", "true"], "--checkpoint-layers: got 'half'"),
        (["--checkpoint-layers", "auto"], "--checkpoint-layers: chooses how many layers --activation-checkpointing"),
    (["--checkpoint-layers", "2"], "--checkpoint-layers: chooses how many layers --activation-checkpointing"),
    (["--master-weights", "bf16", "--fast-path", "off"], "--master-weights: .* or --fast-path on"),
    (["--master-weights", "bf16", "--lora", "true"], "--master-weights: bf16 masters .* full fine-tuning"),
    (["--master-weights", "bf16", "--dtype", "fp32"], "--master-weights: bf16 masters .* of bf16 weights"),
])
def test_bad_options_name_the_option(argv, option):
    with pytest.raises(ConfigError, match=option):
        load_config(argv).validate()


def test_bad_type_names_the_option():
    with pytest.raises(ConfigError, match="--lr: expected float"):
        load_config(["--lr", "fast"])


def test_default_model_follows_the_machine():
    assert TrainConfig().model.resolved(has_gpu=False) == TINY_MODEL
    assert TrainConfig().model.resolved(has_gpu=True) == REAL_MODEL
    assert TrainConfig.from_flat(model="x/y").model.resolved(has_gpu=True) == "x/y"


def test_ds_config_carries_the_run():
    cfg = TrainConfig.from_flat(grad_accum=4, grad_clip=0.5, lr=2e-5, dtype="bf16")
    ds = build_ds_config(ep_size=8, world_size=8, parallel=cfg.parallel, optim=cfg.optim, dtype=cfg.model.dtype)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["expert_parallel"] == {"preset_model": "qwen3_moe", "enabled": True, "autoep_size": 8,
                                     "gate_up_impl": "fused", "combine_impl": "fused_weighted_sum"}
    on_cpu = build_ds_config(ep_size=8, world_size=8, device_type="cpu", optim=cfg.optim)
    assert on_cpu["expert_parallel"]["combine_impl"] == "weighted_sum"
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_allreduce_op"] == "sum"  # loss.backward_scale relies on it
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 2e-5
    assert ds["bf16"]["enabled"] is True
    assert build_ds_config(1, 1, dtype="fp32")["bf16"]["enabled"] is False


def test_every_option_has_a_one_line_help():
    for name, (_, field) in OPTIONS.items():
        assert field.metadata.get("help") and "\n" not in field.metadata["help"], name


def test_help_shows_numeric_defaults_as_numbers_and_bools_as_words():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines: compare with spaces collapsed
    assert "--max-steps INT optimizer steps; 0: run --epochs epochs (default 0)" in text  # 0 == False in a dict lookup
    assert "--grad-accum INT micro-batches per rank per optimizer step (default 1)" in text
    assert "instead of padding (default true)" in text


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
    with pytest.raises(ConfigError, match=r"unknown option lerning_rate; did you mean --lr\?; unknown option "
                       r"per_device_train_batch_size; did you mean --max-tokens-per-batch"):
        load_config(["--config", str(recipe)])
    recipe.write_text("foo: 1\nlearning_rate: 0.1\n")  # the suggestion kept when another key sorts first
    with pytest.raises(ConfigError, match=r"r.yaml: unknown option learning_rate; did you mean --lr\?; unknown "
                                          r"option foo$"):
        load_config(["--config", str(recipe)])
    recipe.write_text("lr: abc\n")
    with pytest.raises(ConfigError, match=r"r.yaml: --lr: expected float, got 'abc'"):
        load_config(["--config", str(recipe)])


def test_other_trainers_names_point_at_options_that_exist():
    """Each suggestion for a transformers Trainer / TRL name loads as written, and no such name is one of ours."""
    defaults = TrainConfig().flat()
    for name, suggestion in OTHER_NAMES.items():
        assert name not in OPTIONS, name
        flag, *value = suggestion.split(" (")[0].split()
        argv = [flag, *value] if value else [flag, str(defaults[flag[2:].replace("-", "_")])]
        load_config(argv).validate()


@pytest.mark.parametrize("recipe", sorted((REPO / "qwen_moe_ft" / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(["--config", str(recipe)]).validate()
    if recipe.stem == "qwen3-30b-a3b-lora-1gpu":  # what lets one GPU hold all 48 layers for LoRA
        assert cfg.lora.enabled and cfg.model.activation_checkpointing and cfg.parallel.ep_size == 1


def test_a_packaged_recipe_loads_by_name():
    assert load_config(["--config", "tiny-lora"]) == load_config(["--config", str(RECIPES / "tiny-lora.yaml")])
    with pytest.raises(ConfigError, match="tiny-lorra does not exist; a YAML file, or a recipe shipped with the "
                                          "package by name: qwen3-30b-a3b-lora, .*tiny-lora, tiny-packed"):
        load_config(["--config", "tiny-lorra"])


def test_the_packaged_deepspeed_config_is_the_one_ds_configs_shows():
    """The default travels inside the package; ds_configs/zero2_ep.json is the copy a reader of the clone finds."""
    shown = REPO / "ds_configs" / "zero2_ep.json"
    assert json.loads(Path(DEFAULT_DS_CONFIG).read_text()) == json.loads(shown.read_text())


def test_checkpoint_layers_counts_the_recomputed_layers():
    def recomputed(*argv):
        return load_config(["--activation-checkpointing", "true", *argv]).model.recomputed_layers(48)

    assert recomputed() == recomputed("--checkpoint-layers", "all") == recomputed("--checkpoint-layers", "0") == 48
    assert recomputed("--checkpoint-layers", "30") == 30
    assert recomputed("--checkpoint-layers", "auto") is None  # the memory estimate's choice (test_memory.py)
    assert load_config([]).model.recomputed_layers(48) == 0


@pytest.mark.parametrize("argv, message", [
    (["--sp-size", "0"], "--sp-size: must be at least 1"),
    (["--sp-size", "2", "--packing", "false"], "--sp-size: splits packed rows over ranks; add --packing true"),
    (["--sp-size", "2", "--router-aux-scope", "micro_batch"], "--sp-size: a micro-batch spans --sp-size ranks"),
    # the row of an SP group holds --max-tokens-per-batch tokens a rank
    (["--sp-size", "2", "--max-tokens-per-batch", "100", "--max-seq-len", "201"],
     r"--max-tokens-per-batch: 100 x --sp-size 2 = 200 cannot hold one example of --max-seq-len 201"),
])
def test_bad_sequence_parallel_options_say_what_to_change(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv).validate()


def test_a_document_may_span_the_ranks_of_an_sp_group():
    cfg = load_config(["--sp-size", "4", "--max-tokens-per-batch", "100", "--max-seq-len", "400"]).validate()
    assert cfg.parallel.sp_size == 4
