"""Fixtures shared by the whole test run; tests under tests/integration/ (multi-process training runs) are marked `integration`, so
`pytest -m "not integration"` is the fast unit loop. Tests marked `gpu` are skipped without a CUDA GPU."""
from pathlib import Path

import pytest

from helpers import TINY

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        if not torch.cuda.is_available():
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture
def deepspeed_swiglu_in_torch(monkeypatch):
    """DeepSpeed's expert SwiGLU in torch, for AutoEP models on CPU tensors on a machine with a GPU: its grouped-GEMM
    paths take its Triton kernel wherever a GPU exists (swiglu_triton._TRITON_AVAILABLE), whatever the tensors'
    device, and the kernel reads GPU memory only. Its own fallback, the one it runs without a GPU, runs instead."""
    from deepspeed.ops.triton_ops import swiglu_triton

    monkeypatch.setattr(swiglu_triton, "_TRITON_AVAILABLE", False)


@pytest.fixture(scope="session")
def process_group():
    """The one-rank process group DeepSpeed and AutoEP need even inside one test process: one for the whole
    test run, as DeepSpeed keeps the expert groups it builds on it in globals."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from qwen_moe_ft.parallel.process import ensure_process_env

    ensure_process_env()
    if not dist.is_initialized():
        deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    yield
    dist.destroy_process_group()
