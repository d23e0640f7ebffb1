import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import TINY
from qwen_moe_ft.model.checkpointing import enable_activation_checkpointing


def _model():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    assert model.config.num_hidden_layers == 2
    return model.train()


def _loss_and_grads(model, recompute: int | None):
    if recompute is not None:
        summary = enable_activation_checkpointing(model, recompute)
        assert summary == f"{recompute or 2} of 2 layers recomputed"
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", [0, 1])
def test_recomputing_some_or_all_layers_gives_the_same_loss_and_gradients(recompute):
    loss, grads = _loss_and_grads(_model(), None)
    model = _model()
    checkpointed, checkpointed_grads = _loss_and_grads(model, recompute)
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    assert flags == ([True, False] if recompute == 1 else [True, True])
    assert checkpointed == loss  # the same ops on the same inputs
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=0, msg=name)


def test_more_layers_than_the_model_has_is_named():
    with pytest.raises(ValueError, match="--checkpoint-layers 3: the model has 2 decoder layers"):
        enable_activation_checkpointing(_model(), 3)
