"""Helpers the tests share: the tiny model's paths, training runs on CPU processes, ZeRO engines on one rank."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny-qwen3-moe"
SAMPLE = REPO / "data" / "sample_sft.jsonl"
EVAL = REPO / "data" / "sample_eval.jsonl"


# The four-process runs of tests/integration/conftest.py
FOUR_RANK_LR, FOUR_RANK_STEPS = 3e-3, 3
FOUR_RANK_RUN = [
    "--data", str(SAMPLE), "--max-steps", str(FOUR_RANK_STEPS), "--max-tokens-per-batch", "512",
    "--max-seq-len", "512", "--lr", str(FOUR_RANK_LR), "--warmup-steps", "0", "--seed", "3",
    # large router coefficients, so the global-scope terms move the weights
    "--router-aux-loss-coef", "0.1", "--router-z-loss-coef", "0.01", "--router-aux-scope", "global",
    "--adam-states", "fp32"]  # bf16 moments round with random bits drawn per partition offset, which EP changes
FOUR_RANK_EP2 = [*FOUR_RANK_RUN, "--ep-size", "2", "--grad-accum", "2"]


def cpu_env() -> dict:
    """CPU processes, also on a machine with GPUs (hidden from them)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


TRAIN_SCRIPT = REPO / "qwen_moe_ft" / "train.py"


def _train_command(output_dir: Path, args, nproc: int, script: Path = TRAIN_SCRIPT) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), "--model", str(TINY), "--dtype", "fp32",
            "--progress-bar", "false", "--output-dir", str(output_dir), *args]


def train(output_dir: Path, *args: str, nproc: int = 2, timeout: int = 600, check: bool = True,
          ) -> subprocess.CompletedProcess:
    """Run qwen_moe_ft/train.py on `nproc` CPU processes (real DeepSpeed over gloo)."""
    proc = subprocess.run(_train_command(output_dir, args, nproc), cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def train_together(runs: list[tuple[Path, list[str]]], nproc: int = 1, timeout: int = 600,
                   script: Path = TRAIN_SCRIPT) -> list[str]:
    """Several runs of `train` at once; their outputs (stdout and stderr). Each process takes one core
    (OMP_NUM_THREADS=1), so two one-process runs cost the 2-core CI machine the time of one, and two two-process
    runs fill the cores through each other's start-up and waits."""
    # output to files, not pipes: a pipe nobody reads yet would block its run once full
    logs = [tempfile.TemporaryFile(mode="w+") for _ in runs]
    procs = [subprocess.Popen(_train_command(out, args, nproc, script), cwd=REPO, env=cpu_env(), stdout=log,
                              stderr=subprocess.STDOUT, text=True) for (out, args), log in zip(runs, logs)]
    outputs = []
    for proc, log in zip(procs, logs):
        proc.wait(timeout=timeout)
        log.seek(0)
        outputs.append(log.read())
        if proc.returncode != 0:
            raise AssertionError(f"training failed ({proc.returncode}):\n{outputs[-1][-8000:]}")
    return outputs


def train_until_sigterm(output_dir: Path, *args: str, after_steps: int, nproc: int = 2) -> str:
    """Start the run of `train`, send it SIGTERM once `after_steps` steps are logged; its output."""
    proc = subprocess.Popen(_train_command(output_dir, args, nproc), cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = Path(output_dir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=300)[0]


def assert_trained_alike(weights: dict, reference: dict, start: dict, steps: int, lr: float) -> None:
    """Two runs that sum the same gradients in another order (ranks' reduce, accumulation, expert all-to-all).
    Float32 rounding of ~1e-7 relative a sum, over a few steps of Adam, leaves ~1e-6 of the weights' mean movement
    (measured up to 1.9e-6; bounded at 1e-5), where a gradient missing from a reduce would move most elements by
    O(lr), i.e. O(1) of it. An element whose gradient nearly cancels over the step (a rare token's lm_head or
    embedding row, an attention weight) has its rounding at ~1e-2 of itself, and Adam's normalised update carries
    that share of the lr a step can move it (measured up to 2.1e-3 of steps x lr)."""
    assert sorted(weights) == sorted(reference) == sorted(start)
    for name, weight in reference.items():
        moved, diff = (weight - start[name]).abs(), (weights[name] - weight).abs()
        assert diff.mean() <= 1e-5 * moved.mean(), name
        assert diff.max() < 1e-2 * steps * lr, name


def max_rel_err(a, b) -> float:
    """Largest absolute difference of a from the reference b, relative to b's largest magnitude."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def bf16_bracket(x):
    """Per fp32 element: the bf16 value next to it towards zero (itself where bf16 holds it) and the one after
    that away from zero, as fp32."""
    import torch

    toward = x.view(torch.int32) & -65536
    return toward.view(torch.float32), (toward + 65536).view(torch.float32)


def assert_unbiased_rounding(exact, rounded) -> None:
    """Each of `rounded` (bf16) is one of the two bf16 values around its `exact` (fp32) one, the upper as often as
    it is near: the sum of the rounding errors is within 6 standard deviations of 0 (a Bernoulli sum's: the square
    root of sum p(1-p) gap^2), among the values nearer the lower neighbour and among the others (round-to-nearest
    errs one way in each)."""
    import torch

    below, above = bf16_bracket(exact)
    rounded = rounded.float()
    assert torch.all((rounded == below) | (rounded == above))
    held = below == exact  # bf16 holds it: no noise may move it
    assert torch.equal(rounded[held], exact[held])
    gap = (above - below).double()
    p = ((exact - below).double() / gap).abs()
    error = rounded.double().abs() - exact.double().abs()  # away from zero: so is "upper" for either sign
    for half in (p < 0.5, p >= 0.5):
        assert abs(error[half].sum().item()) < 6 * (p * (1 - p) * gap**2)[half].sum().sqrt().item()


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def eval_loss(model, tokenizer) -> tuple[float, int]:
    """Loss per label token of a plain transformers model over the sample eval set, as the trainer counts it."""
    import torch
    import torch.nn.functional as F

    from qwen_moe_ft.config import DataConfig
    from qwen_moe_ft.data.rows import IGNORE, tokenize_source
    from qwen_moe_ft.data.packing import collate_padded

    data, _, _ = tokenize_source(str(EVAL), tokenizer, DataConfig(max_seq_len=512))
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), 16):
            batch = collate_padded([data[j] for j in range(i, min(i + 16, len(data)))], tokenizer.pad_token_id)
            logits = model(**batch.inputs).logits
            loss_sum += F.cross_entropy(logits.flatten(0, 1), batch.shift_labels.flatten(), ignore_index=IGNORE,
                                        reduction="sum").item()
            tokens += batch.num_label_tokens
    return loss_sum / tokens, tokens


def autoep_engine(dtype=None):
    """DeepSpeed's ZeRO-2 engine over the tiny model with AutoEP's layers at EP=1, one CPU rank, no patch installed:
    what the fast path installs on."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_moe_ft.parallel.ds_config import build_ds_config
    from qwen_moe_ft.parallel.expert_parallel import apply_autoep

    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=dtype)
    ds_config = build_ds_config(ep_size=1, world_size=1, device_type="cpu",
                                dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    apply_autoep(model, ds_config, rank=0)
    ds_config = {**ds_config, "expert_parallel": {**ds_config["expert_parallel"], "enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def zero_engine(dtype=None, fold_clip=True, fused_states=None, zero_stage=2, reduce_bucket_size=None, grad_accum=1,
                frozen=()):
    """DeepSpeed ZeRO-1/2 over the tiny model on one CPU rank with the lean norm checks (grad_norm.py), and the
    fast path's ZeroState of its optimizer; `fused_states`: the moments' dtype of the one-pass step
    (fuse_adam_step), None for DeepSpeed's step; `frozen`: substrings of the names of parameters not trained."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_moe_ft.config import OptimConfig, ParallelConfig
    from qwen_moe_ft.fastpath.grad_norm import lean_grad_checks
    from qwen_moe_ft.parallel.ds_config import build_ds_config
    from qwen_moe_ft.fastpath.state import ZeroState
    from qwen_moe_ft.fastpath.zero_step import fold_clip_into_adam, fuse_adam_step

    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=dtype)
    for name, param in model.named_parameters():
        param.requires_grad_(not any(part in name for part in frozen))
    ds_config = build_ds_config(ep_size=1, world_size=1, device_type="cpu",
                                parallel=ParallelConfig(zero_stage=zero_stage),
                                optim=OptimConfig(lr=1e-3, grad_clip=1.0, weight_decay=0.1, grad_accum=grad_accum),
                                dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    if reduce_bucket_size:
        ds_config["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_size
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    state = ZeroState(engine.optimizer)
    assert lean_grad_checks(state)
    if fused_states is not None:
        assert fuse_adam_step(state, fused_states)
    elif fold_clip:
        assert fold_clip_into_adam(state)
    return engine, state


def zero_backward(engine, poison: str | None = None, seed: int = 1):
    """One micro-batch (a gradient accumulation boundary without accumulation); `poison` names a parameter whose
    gradient is NaN."""
    import torch

    params = dict(engine.module.named_parameters())
    hook = params[poison].register_hook(lambda g: torch.full_like(g, float("nan"))) if poison else None
    ids = torch.randint(0, 2048, (1, 96), generator=torch.Generator().manual_seed(seed)).to(engine.device)
    engine.backward(engine(input_ids=ids, labels=ids).loss * 100)  # scaled so the clip is active
    if hook:
        hook.remove()
