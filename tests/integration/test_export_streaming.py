"""Streaming export (model/export.py) at EP=2 over two gloo processes: the files equal, tensor for tensor, the
model the ranks hold (loaded from the tiny checkpoint, every weight doubled), in several shards with an index,
and from_pretrained loads them."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import TINY


def _export_at_ep2(rank: int, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import deepspeed
    import torch.distributed as dist
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    from transformers import AutoTokenizer

    from qwen_moe_ft.model.export import save_hf_checkpoint
    from qwen_moe_ft.model.rank_local import load_rank_local
    from qwen_moe_ft.parallel.ds_config import build_ds_config

    deepspeed.init_distributed("gloo")
    ds_config = build_ds_config(ep_size=2, world_size=2, device_type="cpu")
    model = load_rank_local(TINY, AutoConfig.from_pretrained(TINY), torch.float32, "sdpa", ds_config, rank)
    for module in model.modules():
        if isinstance(module, AutoEPMoELayer):
            module.set_deepspeed_parallelism()  # the EP group, as the engine binds it
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2)  # what is written must come from the model, not the file it was read from
    save_hf_checkpoint(model, AutoTokenizer.from_pretrained(TINY), out, is_main=rank == 0, dtype=torch.float32,
                       max_shard_size="300KB")
    dist.destroy_process_group()


def test_streamed_export_at_ep2_equals_the_model_tensor_for_tensor_and_loads(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "hf"
    mp.spawn(_export_at_ep2, args=(str(out), port), nprocs=2)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    written = {}
    for shard in shards:
        written.update(load_file(out / shard))
    source = load_file(TINY / "model.safetensors")
    assert sorted(written) == sorted(source) == sorted(index["weight_map"])
    for key, tensor in source.items():
        assert torch.equal(written[key], 2 * tensor), key  # doubling is exact in float32

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    loaded = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        assert torch.equal(loaded[name], 2 * param), name
    assert (out / "tokenizer.json").exists() and model.generation_config.eos_token_id == 2
