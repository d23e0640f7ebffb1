import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny-qwen3-moe"
SAMPLE = REPO / "data" / "sample_sft.jsonl"
EVAL = REPO / "data" / "sample_eval.jsonl"


def cpu_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def train(output_dir: Path, *args: str, nproc: int = 2, timeout: int = 600, check: bool = True,
          ) -> subprocess.CompletedProcess:
    """Run qwen_moe_ft/train.py on `nproc` CPU processes (real DeepSpeed over gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "qwen_moe_ft" / "train.py"), "--model", str(TINY), "--dtype", "fp32",
           "--progress-bar", "false", "--output-dir", str(output_dir), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def max_rel_err(a, b) -> float:
    """Largest absolute difference of a from the reference b, relative to b's largest magnitude."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def eval_loss(model, tokenizer) -> tuple[float, int]:
    """Loss per label token of a plain transformers model over the sample eval set, as the trainer counts it."""
    import torch
    import torch.nn.functional as F

    from qwen_moe_ft.config import TrainConfig
    from qwen_moe_ft.data import IGNORE, tokenize_source
    from qwen_moe_ft.packing import collate_padded

    data, _, _ = tokenize_source(str(EVAL), tokenizer, TrainConfig(max_seq_len=512))
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), 16):
            batch = collate_padded([data[j] for j in range(i, min(i + 16, len(data)))], tokenizer.pad_token_id)
            logits = model(**batch.inputs).logits
            loss_sum += F.cross_entropy(logits.flatten(0, 1), batch.shift_labels.flatten(), ignore_index=IGNORE,
                                        reduction="sum").item()
            tokens += batch.num_label_tokens
    return loss_sum / tokens, tokens


@pytest.fixture(scope="module")
def process_group():
    """The one-rank process group DeepSpeed and AutoEP need even inside one test process."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from qwen_moe_ft.parallel import ensure_process_env

    ensure_process_env()
    if not dist.is_initialized():
        deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    yield
    dist.destroy_process_group()
