"""The router terms on the tiny model (8 experts, top-2, 2 layers) under AutoEP, through AutoEP's own forward and
the fast path's: load-balancing loss and z-loss with their gradients equal to autograd of the formulas written
out from the router logits, padding and filler batches left out; the default load-balancing loss equal to
transformers' own load_balancing_loss_func; load counts; router freezing."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from helpers import TINY, max_rel_err
from qwen_moe_ft.config import ConfigError, load_config
from qwen_moe_ft.data.packing import MicroBatch, collate_packed, collate_padded, filler_batch, sequence_shard
from qwen_moe_ft.fastpath.local_dispatch import one_rank_dispatch
from qwen_moe_ft.parallel.ds_config import build_ds_config
from qwen_moe_ft.parallel.expert_parallel import apply_autoep
from qwen_moe_ft.router import RouterStats, RouterTerms, freeze_router, real_token_mask

pytestmark = pytest.mark.usefixtures("deepspeed_swiglu_in_torch")  # CPU tensors, GPU or not

AUX, Z = 0.5, 0.05  # large enough that the router terms' gradients are far above float32 rounding


@pytest.fixture(scope="module")
def autoep_model(process_group):
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    apply_autoep(model, build_ds_config(ep_size=1, world_size=1, device_type="cpu"), rank=0)
    return model


def _micro_batches() -> list[MicroBatch]:
    """A full row (no mask), a padded batch (rows of 30 and 17 tokens), and a filler batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 2048, (1, 40), generator=g)
    full = MicroBatch({"input_ids": ids}, ids.clone(), [40])
    padded = collate_padded([{"input_ids": torch.randint(1, 2048, (n,), generator=g).tolist(), "labels": [0] * n}
                             for n in (30, 17)], pad_id=0)
    return [full, padded, filler_batch(0, packing=False)]


def _mask(micro: MicroBatch) -> torch.Tensor:
    if micro.num_tokens == 0:
        return torch.zeros(micro.inputs["input_ids"].numel(), dtype=torch.bool)
    mask = micro.inputs.get("attention_mask")
    return torch.ones(micro.inputs["input_ids"].numel(), dtype=torch.bool) if mask is None else mask.flatten().bool()


def _moe_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "tokens_per_expert")]


def _router_logits(model, micro_batches) -> dict[int, list[torch.Tensor]]:
    """{layer: [router logits of each micro-batch]} of a forward of every micro-batch."""
    layers = _moe_layers(model)
    logits = {i: [] for i in range(len(layers))}
    hooks = [layer.router.gate.register_forward_hook(lambda m, a, out, i=i: logits[i].append(out))
             for i, layer in enumerate(layers)]
    try:
        for micro in micro_batches:
            model.model(**micro.inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return logits


def _reference(model, micro_batches, scope, form):
    """Autograd of the formulas of router.py's docstring, from each layer's router logits of the real tokens."""
    layers = _moe_layers(model)
    assert all(layer.expert_bias is None for layer in layers)  # the router's choice is the top-k of softmax
    top_k, experts = layers[0].top_k, layers[0].num_experts
    logits = _router_logits(model, micro_batches)

    def chosen(probs):  # token-slots per expert
        return torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, experts).sum((0, 1)).float()

    def per_layer(rows):  # coef * E * sum_i f_i * P_i of one layer's rows, f over token-slots
        probs = torch.softmax(rows, dim=-1)
        return AUX * experts * (chosen(probs) / (len(rows) * top_k) * probs.mean(0)).sum()

    def pooled(layer_rows):  # transformers': every layer's rows as one set, f over tokens
        probs = torch.softmax(torch.cat(layer_rows), dim=-1)
        return AUX * experts * (chosen(probs) / len(probs) * probs.mean(0)).sum()

    def balance(layer_rows):
        return pooled(layer_rows) if form == "transformers" else torch.stack([per_layer(r) for r in layer_rows]).mean()

    masks = [_mask(m) for m in micro_batches]
    real = [[x[mask] for x, mask in zip(logits[i], masks)] for i in logits]  # [layer][micro] -> rows
    if scope == "global":
        aux = balance([torch.cat(rows) for rows in real])
    else:
        kept = [j for j, mask in enumerate(masks) if mask.any()]
        aux = torch.stack([balance([rows[j] for rows in real]) for j in kept]).mean()
    z = Z * torch.stack([torch.logsumexp(torch.cat(rows), dim=-1).square().mean() for rows in real]).mean()
    return aux, z


def _ours(model, micro_batches, scope, form="transformers", z=Z):
    terms = RouterTerms(model, aux_coef=AUX, z_coef=z, scope=scope, form=form)
    try:
        terms.start_step(micro_batches, real_tokens=sum(m.num_tokens for m in micro_batches),
                         nonempty_micro_batches=sum(1 for m in micro_batches if m.num_tokens), device="cpu")
        for micro in micro_batches:
            with terms.micro_batch(micro):
                model.model(**micro.inputs, use_cache=False)
            terms.loss().backward()  # one backward per micro-batch, as the trainer's
        return terms, terms.read(terms.step_totals().tolist())
    finally:
        terms.remove()


@pytest.mark.parametrize("forward, form", [("autoep", "transformers"), ("fast_path", "transformers"),
                                           ("checkpointed", "transformers"), ("autoep", "per_layer")])
@pytest.mark.parametrize("scope", ["global", "micro_batch"])
def test_router_terms_and_gradients_equal_the_formulas(autoep_model, scope, forward, form):
    """Float32 throughout: both sides sum a few hundred terms of size ~1/(N E) in another order, so they agree to
    a few hundred float32 roundings of the largest magnitude, far below 1e-5 relative."""
    model = copy.deepcopy(autoep_model)
    if forward == "fast_path":
        assert one_rank_dispatch(model)
    if forward == "checkpointed":  # --activation-checkpointing: the layers' recompute runs no hook
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    micro_batches = _micro_batches()
    aux, z = _reference(model, micro_batches, scope, form)
    (aux + z).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    terms, stats = _ours(model, micro_batches, scope, form)
    assert stats.aux_loss == pytest.approx(aux.item(), rel=1e-6)
    assert stats.z_loss == pytest.approx(z.item(), rel=1e-6)
    ours = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(ours) == sorted(expected)
    assert any("router.gate" in name for name in ours) and any("self_attn" in name for name in ours)
    for name, grad in expected.items():
        assert max_rel_err(ours[name], grad) < 1e-5, name
    # the load counts the real tokens' slots only: 40 + 30 + 17 tokens, top-2, in every layer
    assert [sum(row) for row in stats.load] == [2 * 87] * 2
    if scope == "global":  # the counting pass saw what the training forwards routed
        assert torch.equal(terms.global_counts, terms.step_counts)


@pytest.fixture(scope="module")
def four_layer_autoep_model(process_group):
    """The tiny model's width at 4 layers, random weights: transformers' loss pools its layers."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY, num_hidden_layers=4)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_autoep(model, build_ds_config(ep_size=1, world_size=1, device_type="cpu"), rank=0)
    return model


@pytest.mark.parametrize("padded", [False, True])
def test_default_aux_loss_is_transformers_load_balancing_loss(four_layer_autoep_model, padded):
    """One micro-batch on one rank: coef x transformers' load_balancing_loss_func of the same router logits, and
    the same gradient. Float32 sums of ~100 terms in another order: far below 1e-5 relative."""
    model = four_layer_autoep_model
    micro = _micro_batches()[1 if padded else 0]
    logits = _router_logits(model, [micro])
    top_k, experts = model.config.num_experts_per_tok, model.config.num_experts
    expected = AUX * load_balancing_loss_func(tuple(x[0] for x in logits.values()), experts, top_k,
                                              micro.inputs.get("attention_mask"))
    expected.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    terms, stats = _ours(model, [micro], "global", z=0.0)
    terms.remove()
    assert stats.aux_loss == pytest.approx(expected.item(), rel=1e-6)
    ours = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert sorted(ours) == sorted(reference) and len([n for n in ours if "router.gate" in n]) == 4
    for name, grad in reference.items():
        assert max_rel_err(ours[name], grad) < 1e-5, name


def test_aux_loss_at_even_routing_is_coef_times_top_k_or_coef_per_layer(autoep_model):
    """Logits that tie every expert: P_i = 1/E and each expert takes N K / E slots, whatever top-k breaks the ties."""
    layers = len(_moe_layers(autoep_model))
    for form, expected in (("transformers", AUX * 2), ("per_layer", AUX)):
        terms = RouterTerms(autoep_model, aux_coef=AUX, z_coef=0.0, scope="global", form=form)
        try:
            counts = torch.full((layers, 8), 2 * 64 / 8)
            probs = torch.full((layers, 8), 64 / 8)
            assert terms._balance(counts, probs, tokens=64).item() * AUX == pytest.approx(expected, rel=1e-6)
        finally:
            terms.remove()


def test_one_micro_batch_needs_no_counting_pass(autoep_model):
    terms = RouterTerms(autoep_model, aux_coef=AUX, z_coef=0.0, scope="global")
    try:
        assert not terms.needs_counting_pass(1) and terms.needs_counting_pass(2)
        assert not RouterTerms(autoep_model, aux_coef=0.0, z_coef=0.0, scope="global").needs_counting_pass(2)
    finally:
        terms.remove()


def test_hooks_record_nothing_outside_a_training_micro_batch(autoep_model):
    terms = RouterTerms(autoep_model, aux_coef=AUX, z_coef=Z, scope="global")
    try:
        with torch.no_grad():
            autoep_model.model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)
        assert terms._capture is None and terms._logits is None
    finally:
        terms.remove()


def test_expert_load_max_and_dead_experts():
    stats = RouterStats(aux_loss=0.0, z_loss=0.0, load=[[4, 4, 4, 4], [10, 6, 0, 0]])
    assert stats.expert_load_max == 2.5  # layer 1: 10 over the mean 4
    assert stats.dead_experts == 2


def test_freeze_router_before_autoep_freezes_autoeps_gates_alone(process_group):
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    assert freeze_router(model) == 2
    apply_autoep(model, build_ds_config(ep_size=1, world_size=1, device_type="cpu"), rank=0)
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    assert frozen == [f"model.layers.{i}.mlp.router.gate.weight" for i in range(2)]


@pytest.mark.parametrize("option, value", [("--router-aux-loss-coef", "-0.1"), ("--router-z-loss-coef", "-1"),
                                           ("--router-aux-scope", "batch"), ("--router-aux-loss-form", "megatron"),
                                           ("--expert-load-steps", "-1")])
def test_bad_router_values_name_the_option(option, value):
    with pytest.raises(ConfigError, match=option):
        load_config([option, value]).validate()


def test_router_aux_loss_coef_left_out_is_the_model_configs():
    from transformers import AutoConfig

    from qwen_moe_ft.router import resolve_aux_coef

    config = AutoConfig.from_pretrained(TINY)
    assert load_config([]).router.aux_loss_coef is None
    assert resolve_aux_coef(None, config) == config.router_aux_loss_coef == 0.001
    assert resolve_aux_coef(load_config(["--router-aux-loss-coef", "0"]).validate().router.aux_loss_coef, config) == 0


def test_a_sequence_shard_counts_its_slice_of_the_row_and_none_of_the_padding():
    """A 5-token row over 4 ranks (padded to 8): 2, 2, 1 and 0 real tokens."""
    row = collate_packed([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    masks = [real_token_mask(sequence_shard(row, part, 4, pad_id=0)) for part in range(4)]
    assert masks[0] is None and masks[1] is None  # every token of the slice is real
    assert [m.tolist() for m in masks[2:]] == [[1.0, 0.0], [0.0, 0.0]]
