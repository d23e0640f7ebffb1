"""Writing a state dict tensor by tensor into the files save_torch_state_dict would write for it (one
`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`), holding at
most the shard being filled in memory."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file


class ShardWriter:
    """`layout`: every key with a tensor of its shape and dtype (meta tensors do), in the order `add` will give
    them; each shard is written as soon as its last tensor arrives, so only one is ever held."""

    def __init__(self, directory: str | Path, layout: dict[str, torch.Tensor], max_shard_size: int | str):
        self.directory = Path(directory)
        self.layout = layout
        self.split = split_torch_state_dict_into_shards(layout, max_shard_size=max_shard_size)
        self._filling: dict[str, dict[str, torch.Tensor]] = {}
        self._written: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.layout[key]
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(f"{key}: got {tuple(tensor.shape)} {tensor.dtype}, the layout says "
                             f"{tuple(expected.shape)} {expected.dtype}")
        filename = self.split.tensor_to_filename[key]
        shard = self._filling.setdefault(filename, {})
        shard[key] = tensor.contiguous()
        if len(shard) == len(self.split.filename_to_tensors[filename]):
            save_file(shard, self.directory / filename, metadata={"format": "pt"})
            del self._filling[filename]
            self._written.add(filename)

    def close(self) -> None:
        unwritten = [f for f in self.split.filename_to_tensors if f not in self._written]
        if unwritten:
            missing = [k for f in unwritten for k in self.split.filename_to_tensors[f]
                       if k not in self._filling.get(f, {})]
            raise ValueError(f"{len(missing)} tensors never given, e.g. {missing[:3]}")
        if self.split.is_sharded:
            index = {"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
