"""tools/random_checkpoint.py: a random checkpoint in the hub layout that from_pretrained and the rank-local
loader both load, to the same logits."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.model.rank_local import load_rank_local
from qwen_moe_ft.parallel.ds_config import build_ds_config
from qwen_moe_ft.tools.random_checkpoint import main

pytestmark = pytest.mark.usefixtures("deepspeed_swiglu_in_torch")  # CPU tensors, GPU or not


def test_random_checkpoint_loads_with_from_pretrained_and_rank_local_to_equal_logits(tmp_path, process_group):
    assert main(["--config", str(TINY), "--layers", "3", "--out", str(tmp_path), "--dtype", "fp32",
                 "--max-shard-size", "400KB"]) == 0
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in index["weight_map"]
    reference, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reference.config.num_hidden_layers == 3
    assert torch.equal(reference.model.layers[1].input_layernorm.weight, torch.ones(64))
    assert 0.015 < reference.model.layers[2].mlp.experts.down_proj.std() < 0.025  # initializer_range 0.02

    config = AutoConfig.from_pretrained(tmp_path)
    ds_config = build_ds_config(ep_size=1, world_size=1, device_type="cpu")
    ours = load_rank_local(tmp_path, config, torch.float32, "sdpa", ds_config, 0)
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # same weights, AutoEP's grouped experts in place of transformers' loop: float32 rounding at most
        assert max_rel_err(ours(input_ids=ids).logits, reference(input_ids=ids).logits) < 1e-6
