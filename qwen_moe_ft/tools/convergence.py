"""Do bf16 Adam moments (and bf16 master weights) train as well as fp32 ones? Loss curves of optimizers on the same
data, one GPU.

    python -m qwen_moe_ft.tools.convergence --steps 500 [--layers 4] [--out convergence.json]
    python -m qwen_moe_ft.tools.convergence --plot convergence.json [--png convergence.png]

Runs, each in a fresh subprocess on the Qwen3-30B-A3B shape cut to --layers (random init, seeded):
- `ours_bf16`: our trainer, fast path, AdamW moments in bf16 (the default);
- `ours_fp32`: the same with fp32 moments;
- `ours_bf16_masters`: bf16 moments and the bf16 weights as the masters, rounded stochastically
  (`--master-weights bf16`);
- `hf_adamw`: transformers' model (grouped_mm experts, our packed attention) with fp32 master weights and
  torch's fused AdamW in fp32, the mixed-precision reference.
Same packed batches, learning-rate schedule, betas, clipping and seed; no router losses (the curves compare the
LM loss). A random-init model learns nothing from uniform random tokens, so the documents here follow a fixed
random bigram chain (each token has a few likely successors: a loss floor well below the start) with the
benchmark's chat-like lengths. Results are written after every run: a run that dies keeps the others.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import torch

from ..config import QWEN3_30B_A3B
from ..data.packing import collate_packed
from ..lr_schedule import lr_lambda
from ..bench.benchmark import document_lengths
from ..bench.harness import tool_parser

# our runs' (adam_states, master_weights)
OURS = {"ours_bf16": ("bf16", "fp32"), "ours_fp32": ("fp32", "fp32"), "ours_bf16_masters": ("bf16", "bf16")}
RUNS = (*OURS, "hf_adamw")
BETAS, EPS, GRAD_CLIP, MIN_LR_RATIO = (0.9, 0.95), 1e-8, 1.0, 0.1


def bigram_chain(vocab: int, successors: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: `successors` next tokens and their probabilities (flat Dirichlet), fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, successors), generator=g)
    weights = -torch.rand(vocab, successors, generator=g).log()  # normalised exponentials: Dirichlet(1, ..., 1)
    return nxt, weights / weights.sum(-1, keepdim=True)


def chain_entropy(probs: torch.Tensor) -> float:
    """Mean entropy of the next token (nats): the loss floor, were every token equally often the previous one."""
    return float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())


def make_batches(steps: int, tokens: int, lengths: str, vocab: int, seed: int, successors: int = 8):
    """`steps` packed batches of documents walking the chain; returns them and the chain's entropy."""
    nxt, probs = bigram_chain(vocab, successors, seed)
    cdf = probs.cumsum(-1)
    rng = random.Random(seed)
    plan = [document_lengths(tokens, lengths, rng) for _ in range(steps)]
    sizes = [n for step in plan for n in step]
    g = torch.Generator().manual_seed(seed + 1)
    walks = torch.empty(len(sizes), max(sizes), dtype=torch.long)
    walks[:, 0] = torch.randint(0, vocab, (len(sizes),), generator=g)
    for pos in range(1, walks.shape[1]):  # every document advances together
        cur = walks[:, pos - 1]
        pick = (torch.rand(len(sizes), 1, generator=g) > cdf[cur]).sum(-1).clamp_max(successors - 1)
        walks[:, pos] = nxt[cur, pick]
    batches, doc = [], 0
    for step in plan:
        docs = []
        for n in step:
            ids = walks[doc, :n].tolist()
            docs.append({"input_ids": ids, "labels": list(ids)})
            doc += 1
        batches.append(docs)
    return batches, chain_entropy(probs)


def _ours(args, batches):
    from ..train import Trainer
    from ..bench.benchmark import trainer_config

    cfg = trainer_config(args.model, args.layers, args.tokens, args.attn, len(batches), args.scratch, args.seed,
                         lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=MIN_LR_RATIO, adam_beta1=BETAS[0],
                         adam_beta2=BETAS[1], adam_eps=EPS, grad_clip=GRAD_CLIP, router_aux_loss_coef=0.0,
                         adam_states=OURS[args.run][0], master_weights=OURS[args.run][1])
    trainer = Trainer(cfg)
    trainer.engine.train()
    for i, docs in enumerate(batches):
        yield trainer.run_step([collate_packed(docs)], step=i + 1, epoch=1).loss


def _hf_adamw(args, batches):
    """bf16 forward/backward, fp32 master weights updated by torch's fused AdamW, copied back each step."""
    from transformers import AutoModelForCausalLM, set_seed

    from ..config import ModelConfig
    from ..data.rows import IGNORE
    from ..model.attention import register_varlen_attention, select_backend
    from ..model.loading import load_model_config

    set_seed(args.seed)
    config = load_model_config(ModelConfig(random_init=True, num_hidden_layers=args.layers), args.model)
    config.router_aux_loss_coef = 0.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = register_varlen_attention(select_backend(args.attn, device))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention,
                                                 experts_implementation="grouped_mm")
    model.train()
    params = list(model.parameters())
    master = [p.detach().float().requires_grad_() for p in params]
    opt = torch.optim.AdamW(master, lr=args.lr, betas=BETAS, eps=EPS, weight_decay=0.0, fused=device == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda("cosine", args.warmup_steps, len(batches), MIN_LR_RATIO))
    for docs in batches:
        micro = collate_packed(docs).to(device)
        logits = model(**micro.inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), micro.shift_labels.flatten(),
                                                 ignore_index=IGNORE)
        loss.backward()
        for p, m in zip(params, master):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, GRAD_CLIP)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
        yield float(loss)


def worker(args) -> dict:
    batches, floor = make_batches(args.steps, args.tokens, args.lengths, args.data_vocab, args.seed)
    run = _hf_adamw if args.run == "hf_adamw" else _ours
    losses = []
    for i, loss in enumerate(run(args, batches)):
        losses.append(loss)
        if (i + 1) % 50 == 0:
            print(f"[{args.run}] step {i + 1}: loss {loss:.4f}", file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return dict(run=args.run, losses=losses, loss_floor=floor, peak_mem_gib=peak)


def smoothed(losses: list[float], window: int) -> float:
    """Mean of the last `window` losses: the per-step noise of one batch's loss averaged out."""
    tail = losses[-window:]
    return sum(tail) / len(tail)


def summarise(report: dict, window: int) -> dict:
    finals = {r: smoothed(v["losses"], window) for r, v in report["runs"].items() if v.get("losses")}
    ref = finals.get("hf_adamw")
    return dict(final_smoothed={r: round(f, 5) for r, f in finals.items()}, window=window,
                relative_to_hf_adamw={r: round(f / ref - 1, 5) for r, f in finals.items()} if ref else {})


def plot(report: dict, png: str, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, tail) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, v in report["runs"].items():
        losses = v.get("losses") or []
        ema, curve = None, []
        for x in losses:  # an exponential average with the window's time constant
            ema = x if ema is None else ema + (x - ema) * 2 / (window + 1)
            curve.append(ema)
        for ax in (full, tail):
            ax.plot(range(1, len(curve) + 1), curve, label=run)
    floor = next(iter(report["runs"].values())).get("loss_floor")
    for ax in (full, tail):
        if floor:
            ax.axhline(floor, color="grey", linestyle=":", label="bigram entropy")
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss (EMA, {window} steps)")
    steps = max(len(v.get("losses") or []) for v in report["runs"].values())
    tail.set_xlim(steps // 2, steps)
    lows = [v["losses"][steps // 2:] for v in report["runs"].values() if v.get("losses")]
    if lows:
        tail.set_ylim(min(min(x) for x in lows) * 0.98, max(max(x) for x in lows) * 1.02)
    full.legend()
    fig.suptitle(f"{report.get('gpu', '')}: {report.get('layers')} layers, {report.get('tokens')} tokens/step, "
                 f"lr {report.get('lr')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("qwen_moe_ft.tools.convergence", __doc__)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (one packed micro-batch)")
    parser.add_argument("--lengths", default="chat", help="document lengths: full, chat or mixed (as the benchmark)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=25)
    parser.add_argument("--data-vocab", type=int, default=8192, help="tokens the bigram chain uses")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--attn", default="auto")
    parser.add_argument("--model", default=QWEN3_30B_A3B)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=50, help="steps averaged for the final loss and the curves")
    parser.add_argument("--out", default="convergence.json")
    parser.add_argument("--png", default=None, help="default: --out with .png")
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG of earlier --out files (comma list)")
    parser.add_argument("--scratch", default="outputs/convergence")
    parser.add_argument("--worker", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    png = args.png or str(Path((args.plot or args.out).split(",")[0]).with_suffix(".png"))
    if args.plot:  # several files: runs made in separate calls, merged (the first file's settings head the plot)
        reports = [json.loads(Path(f).read_text()) for f in args.plot.split(",")]
        report = dict(reports[0], runs={run: v for r in reports for run, v in r["runs"].items()})
        plot(report, png, report.get("window", args.window))
        print(json.dumps(summarise(report, report.get("window", args.window)), indent=1))
        return 0
    if args.worker:
        args.run = args.worker
        print(json.dumps(worker(args)))
        return 0
    report = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", layers=args.layers,
                  tokens=args.tokens, lengths=args.lengths, lr=args.lr, warmup_steps=args.warmup_steps,
                  steps=args.steps, seed=args.seed, window=args.window, runs={})
    passed = list(argv if argv is not None else sys.argv[1:])
    for run in args.runs.split(","):
        if run not in RUNS:
            parser.error(f"--runs: unknown run {run!r}; choose from {', '.join(RUNS)}")
        proc = subprocess.run([sys.executable, "-m", "qwen_moe_ft.tools.convergence", *passed, "--worker", run],
                              stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            report["runs"][run] = dict(error=f"exit {proc.returncode}")
        else:
            report["runs"][run] = json.loads(lines[-1])
        Path(args.out).write_text(json.dumps(report))
        print(f"{run}: {summarise(report, args.window)['final_smoothed'].get(run, report['runs'][run].get('error'))}",
              flush=True)
    summary = summarise(report, args.window)
    report["summary"] = summary
    Path(args.out).write_text(json.dumps(report))
    plot(report, png, args.window)
    print(json.dumps(summary, indent=1))
    return 0 if all(math.isfinite(v) for v in summary["final_smoothed"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
