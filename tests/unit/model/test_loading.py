import pytest
from transformers import Qwen2MoeConfig

from helpers import TINY
from qwen_moe_ft.config import ModelConfig
from qwen_moe_ft.model.loading import ModelLoadError, load_model_config


def test_the_tiny_qwen3_moe_is_accepted():
    assert load_model_config(ModelConfig(), str(TINY)).model_type == "qwen3_moe"


def test_qwen2_moe_is_refused_naming_what_is_supported(tmp_path):
    """Its shared expert would be exported under names transformers drops on reload: refused, not silently wrong."""
    Qwen2MoeConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'qwen2_moe' model; this package trains Qwen3-MoE models only"):
        load_model_config(ModelConfig(), str(tmp_path))


def test_empty_local_directory_says_it_has_no_config_json(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model_config(ModelConfig(), str(tmp_path))
    assert "local directory without config.json" in str(err.value) and "hf download " + str(tmp_path) not in str(err.value)


@pytest.mark.parametrize("name", ["{tmp}/missing", "./missing", "{tmp}/a/b"])
def test_a_local_path_that_does_not_exist_is_reported_missing_never_fetched(tmp_path, monkeypatch, name):
    """As an installed package's default under site-packages/data/ was: the hub would be asked for a repo id, and
    answer about its form after retries."""
    def fetch(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", fetch)
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError, match=rf"{name}: no such directory; --model \(and --tokenizer\) take a "
                                             r"directory written by save_pretrained"):
        load_model_config(ModelConfig(), name)
