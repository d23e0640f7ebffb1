"""Reading a checkpoint's safetensors shards tensor by tensor, every failure naming the file and the tensor."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ModelLoadError(RuntimeError):
    pass


class Shards:
    """The tensors of `model.safetensors` or of the shards `model.safetensors.index.json` lists; each file is
    opened (memory-mapped) once, on first use, and only the tensors asked for are read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._open: dict[str, object] = {}
        if (self.directory / INDEX).exists():
            self.weight_map: dict[str, str] = json.loads((self.directory / INDEX).read_text())["weight_map"]
        elif (self.directory / SINGLE).exists():
            self.weight_map = {key: SINGLE for key in self._file(SINGLE, "its tensor list").keys()}
        else:
            raise ModelLoadError(f"{self.directory} holds neither {INDEX} nor {SINGLE}")

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _file(self, filename: str, key: str):
        if filename not in self._open:
            path = self.directory / filename
            if not path.exists():
                raise ModelLoadError(f"{path} is missing (the index puts {key} in it)")
            try:
                self._open[filename] = safe_open(str(path), framework="pt")
            except SafetensorError as err:  # a truncated file fails here: its header points past the end
                raise ModelLoadError(f"{path} is unreadable while looking for {key}: {err}") from err
        return self._open[filename]

    def _where(self, key: str) -> tuple[str, object]:
        if key not in self.weight_map:
            raise ModelLoadError(f"{key} is in none of the checkpoint's files ({self.directory})")
        filename = self.weight_map[key]
        handle = self._file(filename, key)
        if key not in handle.keys():
            raise ModelLoadError(f"{self.directory / filename} lacks {key}, which the index puts there")
        return filename, handle

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """That `key` exists, in a readable file, with this shape."""
        filename, handle = self._where(key)
        found = tuple(handle.get_slice(key).get_shape())
        if found != tuple(shape):
            raise ModelLoadError(f"{key} in {self.directory / filename} has shape {list(found)}, the model "
                                 f"expects {list(shape)} (is the config that of this checkpoint?)")

    def read(self, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor `key`, or only its `index` (slices of the leading dims), as stored."""
        filename, handle = self._where(key)
        try:
            return handle.get_slice(key)[index] if index else handle.get_tensor(key)
        except SafetensorError as err:
            raise ModelLoadError(f"cannot read {key} from {self.directory / filename}: {err}") from err

    def close(self) -> None:
        self._open.clear()  # safe_open handles unmap when dropped
