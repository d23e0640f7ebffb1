"""Rank-local loading (model/rank_local.py, model/shards.py): this rank's AutoEP model filled from the shards
equals what from_pretrained loads, from the hub's per-expert keys and from fused expert tensors, and a broken
checkpoint stops the load naming the file and the tensor."""
import json
import os

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.model.rank_local import load_rank_local
from qwen_moe_ft.model.shards import ModelLoadError, Shards
from qwen_moe_ft.parallel.ds_config import build_ds_config

pytestmark = pytest.mark.usefixtures("deepspeed_swiglu_in_torch")  # CPU tensors, GPU or not

EXPERTS = 8


@pytest.fixture(scope="module")
def reference():
    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory, reference):
    """The tiny model as transformers 5 keeps it in memory: experts fused (gate_up_proj, down_proj)."""
    out = tmp_path_factory.mktemp("fused")
    reference.save_pretrained(out, save_original_format=False)
    return out


def _load(directory, ep_size=1, rank=0, dtype=torch.float32):
    ds_config = build_ds_config(ep_size=ep_size, world_size=ep_size, device_type="cpu")
    return load_rank_local(directory, AutoConfig.from_pretrained(TINY), dtype, "sdpa", ds_config, rank)


def test_fused_copy_really_is_fused(fused_dir):
    keys = load_file(fused_dir / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.experts.0.gate_proj.weight" not in keys
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in load_file(TINY / "model.safetensors")


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_ep1_logits_equal_from_pretrained(process_group, reference, fused_dir, layout):
    """Same weights, AutoEP's grouped experts in place of transformers' loop: equal to float32 rounding of logits
    ~1 in magnitude (observed bitwise equal)."""
    model = _load(TINY if layout == "per_expert" else fused_dir)
    assert not model.training and all(not p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert max_rel_err(ours, theirs) < 1e-6


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_each_ep2_rank_holds_exactly_its_experts_and_every_dense_weight(process_group, reference, fused_dir, layout):
    ref = dict(reference.named_parameters())
    inter = reference.config.moe_intermediate_size
    for rank in (0, 1):
        model = _load(TINY if layout == "per_expert" else fused_dir, ep_size=2, rank=rank)
        block = slice(rank * EXPERTS // 2, (rank + 1) * EXPERTS // 2)
        for name, param in model.named_parameters():
            if ".experts.w" in name:
                layer = name.rsplit(".experts.", 1)[0]
                gate_up, down = ref[f"{layer}.experts.gate_up_proj"], ref[f"{layer}.experts.down_proj"]
                expected = {"w1": gate_up[block, :inter], "w3": gate_up[block, inter:], "w2": down[block]}[name[-2:]]
            else:
                expected = ref[name.replace(".mlp.router.gate.", ".mlp.gate.")]
            assert torch.equal(param, expected), (rank, name)
        experts = model.model.layers[0].mlp.experts.w1
        assert experts.shape[0] == EXPERTS // 2 and experts.group_name == "ep_size_2" and not experts.allreduce


def test_bf16_from_a_float32_checkpoint_rounds_as_from_pretrained(process_group):
    model = _load(TINY, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16)
    ours = dict(model.named_parameters())
    assert ours["model.layers.1.mlp.experts.w2"].dtype == torch.bfloat16
    assert torch.equal(ours["model.layers.1.mlp.experts.w2"], ref.model.layers[1].mlp.experts.down_proj)
    assert torch.equal(ours["lm_head.weight"], ref.lm_head.weight)


@pytest.fixture
def sharded(tmp_path):
    """The tiny checkpoint in several shards with an index, as the hub stores Qwen3-30B-A3B."""
    state = load_file(TINY / "model.safetensors")
    save_torch_state_dict(state, tmp_path, max_shard_size="400KB")
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((TINY / name).read_text())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    return tmp_path, index


def test_a_sharded_checkpoint_loads(process_group, sharded, reference):
    directory, _ = sharded
    assert torch.equal(dict(_load(directory).named_parameters())["model.layers.1.mlp.experts.w3"],
                       reference.model.layers[1].mlp.experts.gate_up_proj[:, 64:])


def _shard_of(index, key):
    return index["weight_map"][key]


def test_a_missing_shard_names_the_file_and_a_tensor_in_it(process_group, sharded):
    directory, index = sharded
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    os.remove(directory / _shard_of(index, key))
    with pytest.raises(ModelLoadError, match=rf"{_shard_of(index, key)} is missing \(the index puts model\..* in it"):
        _load(directory)


def test_a_truncated_shard_names_the_file_and_a_tensor(process_group, sharded):
    directory, index = sharded
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    path = directory / _shard_of(index, key)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(ModelLoadError, match=rf"{path.name} is unreadable while looking for model\..*not fully"):
        _load(directory)


def test_a_tensor_of_the_wrong_shape_names_the_file_the_tensor_and_both_shapes(process_group, sharded):
    directory, index = sharded
    key = "model.layers.0.self_attn.k_proj.weight"
    path = directory / _shard_of(index, key)
    state = load_file(path)
    state[key] = state[key][:16].clone()
    save_file(state, path)
    with pytest.raises(ModelLoadError, match=rf"{key} in .*{path.name} has shape \[16, 64\], the model expects "
                                             r"\[32, 64\]"):
        _load(directory)


def test_a_tensor_missing_from_the_checkpoint_is_named(process_group, sharded):
    directory, index = sharded
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    del index["weight_map"][key]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"{key} is in none of the checkpoint's files"):
        _load(directory)


def test_a_tensor_the_index_misplaces_names_the_file(process_group, sharded):
    directory, index = sharded
    key = "model.norm.weight"
    wrong = next(f for f in set(index["weight_map"].values()) if f != _shard_of(index, key))
    index["weight_map"][key] = wrong
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"{wrong} lacks {key}, which the index puts there"):
        _load(directory)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(ModelLoadError, match="holds neither model.safetensors.index.json nor model.safetensors"):
        Shards(tmp_path)


def test_shards_read_only_the_rows_asked_for():
    shards = Shards(TINY)
    key = "model.layers.0.mlp.experts.2.gate_proj.weight"
    assert torch.equal(shards.read(key, (slice(3, 5),)), load_file(TINY / "model.safetensors")[key][3:5])
