"""ShardWriter writes, tensor by tensor, the files save_torch_state_dict writes for the whole state dict."""
import json

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from qwen_moe_ft.model.shard_writer import ShardWriter


def _state():
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(100 + i, 64, generator=g) for i in range(7)}


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("max_shard_size", ["80KB", "10MB"])
def test_same_files_index_and_tensors_as_save_torch_state_dict(tmp_path, max_shard_size):
    state = _state()
    (ours := tmp_path / "ours").mkdir()
    (theirs := tmp_path / "theirs").mkdir()
    save_torch_state_dict(state, theirs, max_shard_size=max_shard_size)
    writer = ShardWriter(ours, {k: torch.empty_like(v, device="meta") for k, v in state.items()}, max_shard_size)
    for key, tensor in state.items():
        writer.add(key, tensor)
    writer.close()
    assert _files(ours) == _files(theirs)
    safetensors = [f for f in _files(ours) if f.endswith(".safetensors")]
    assert len(safetensors) == (3 if max_shard_size == "80KB" else 1)
    for name in safetensors:
        a, b = load_file(ours / name), load_file(theirs / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if len(safetensors) > 1:
        index = json.loads((ours / "model.safetensors.index.json").read_text())
        assert index == json.loads((theirs / "model.safetensors.index.json").read_text())


def test_each_shard_is_written_when_complete_and_only_it_is_held(tmp_path):
    state = _state()
    writer = ShardWriter(tmp_path, {k: torch.empty_like(v, device="meta") for k, v in state.items()}, "80KB")
    held = []
    for key, tensor in state.items():
        writer.add(key, tensor)
        held.append(sum(len(s) for s in writer._filling.values()))
    assert max(held) <= 3  # an 80 KB shard holds at most three of these 26 KB tensors
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_tensor_of_another_shape_or_a_missing_one_is_refused(tmp_path):
    state = _state()
    writer = ShardWriter(tmp_path, {k: torch.empty_like(v, device="meta") for k, v in state.items()}, "80KB")
    with pytest.raises(ValueError, match=r"w0: got \(3, 64\)"):
        writer.add("w0", torch.zeros(3, 64))
    writer.add("w0", state["w0"])
    with pytest.raises(ValueError, match=r"6 tensors never given, e.g. \['w1', 'w2', 'w3'\]"):
        writer.close()
