import math

import pytest
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from qwen_moe_ft.flops import flops_per_token, is_sparse_layer, mean_causal_context, peak_tflops


def qwen3_30b_a3b(layers=48, **overrides):
    return Qwen3MoeConfig(**{**dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                    moe_intermediate_size=768, num_hidden_layers=layers, num_attention_heads=32,
                                    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8),
                             **overrides})


def test_qwen3_30b_a3b_at_4096_token_documents_by_hand():
    # Per layer, by hand: q,k,v,o = 2048*128*(32+4+4+32) = 18,874,368; top-8 experts 8*3*2048*768 = 37,748,736;
    # router 128*2048 = 262,144 -> 6 x 56,885,248 = 341,311,488; attention 12*32*128*2048.5 = 100,687,872.
    # 48 layers = 21,215,969,280; LM head 6*151936*2048 = 1,866,989,568.
    context = mean_causal_context([4096])
    assert context == 2048.5
    assert flops_per_token(qwen3_30b_a3b(), context) == 23_082_958_848
    assert round(flops_per_token(qwen3_30b_a3b(), context) / 1e9, 1) == 23.1


def test_lora_counts_no_weight_gradients():
    # By hand: weight terms 4/6 of the above: 4 x 56,885,248 = 227,540,992 per layer + the same attention
    # 100,687,872 -> 48 x 328,228,864 = 15,754,985,472; LM head 4*151936*2048 = 1,244,659,712.
    assert flops_per_token(qwen3_30b_a3b(), 2048.5, frozen_weights=True) == 16_999_645_184


def test_per_layer_difference_is_one_layer():
    c2, c4 = qwen3_30b_a3b(2), qwen3_30b_a3b(4)
    per_layer = (flops_per_token(c4, 2048.5) - flops_per_token(c2, 2048.5)) / 2
    assert per_layer == 441_999_360


def test_dense_mlp_layers_count_their_own_mlp_and_no_router():
    # 4 layers, mlp_only_layers [0], decoder_sparse_step 2: layer 0 dense (listed), 1 sparse ((1+1) % 2 == 0),
    # 2 dense (3 % 2 == 1), 3 sparse. A made-up intermediate_size 3072 keeps a dense MLP apart from the top-8
    # experts (at 6144 the two hold the same 37,748,736 parameters).
    # By hand: attention 4 x 18,874,368 = 75,497,472; sparse MLP 37,748,736 + router 262,144 = 38,010,880,
    # dense MLP 3*2048*3072 = 18,874,368 -> 2 x 38,010,880 + 2 x 18,874,368 = 113,770,496;
    # 6 x (75,497,472 + 113,770,496) = 1,135,607,808; attention scores 4 x 100,687,872 = 402,751,488;
    # LM head 1,866,989,568. All sparse it would be 4 x 441,999,360 + 1,866,989,568 = 3,634,987,008.
    config = qwen3_30b_a3b(4, mlp_only_layers=[0], decoder_sparse_step=2, intermediate_size=3072)
    assert [is_sparse_layer(config, layer) for layer in range(4)] == [False, True, False, True]
    assert flops_per_token(config, 2048.5) == 3_405_348_864


def test_sparse_layers_are_the_ones_transformers_builds():
    config = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                            num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1, 5], decoder_sparse_step=2)
    model = Qwen3MoeForCausalLM(config)
    built = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in model.model.layers]
    assert built == [is_sparse_layer(config, layer) for layer in range(6)] == [False, False, False, True, False, False]


def test_mean_causal_context_weights_documents_by_tokens():
    # A 1-token document attends to 1 key; a 3-token one to 1, 2, 3 keys: (1 + 6) / 4 tokens.
    assert mean_causal_context([1, 3]) == pytest.approx(7 / 4)
    assert mean_causal_context([0, 0]) == 0.0
    # Packing short documents shrinks the attention term against one long document.
    assert mean_causal_context([1024] * 4) < mean_causal_context([4096])


def test_peak_lookup_matches_whole_names():
    # NVIDIA's bf16 dense figures: H100 SXM 989, H100 PCIe 756, H100 NVL 835 (half of 1979, 1513, 1671 sparse)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA H20") == 148.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    # a name that contains a known one is another product: no number is better than a wrong one
    assert peak_tflops("NVIDIA H20-3e") is None
    assert peak_tflops("NVIDIA RTX PRO 6000 Blackwell Server Edition") is None
    assert peak_tflops(None) is None
    assert math.isfinite(flops_per_token(qwen3_30b_a3b(1), 1.0))
