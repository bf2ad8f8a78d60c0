"""casa_hf on the Transformers vLLM pins (`transformers_compat.py`): the config builds its sub-configs itself where
Transformers cannot (< 5.20), and the models refuse a Transformers they would misread. test_vllm.py runs the config,
processor and CASA attention under vLLM's own Transformers (5.19)."""

import pytest
import transformers
from tiny import TINY_TEXT, TINY_VISION, tiny_config, tiny_model

from casa_hf import configuration_casa


def test_the_models_refuse_an_older_transformers_by_name(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.19.0")
    with pytest.raises(ImportError, match=r"need transformers>=5\.25, this environment has 5\.19\.0"):
        tiny_model()
    config = tiny_config()  # the config still builds: vLLM's plugin reads it
    assert config.text_config.hidden_size == TINY_TEXT["hidden_size"]


def test_sub_configs_built_without_sub_config_specs(monkeypatch):
    """The path Transformers < 5.20 takes (no `SubConfigSpec`): the same config as from `sub_configs_defaults`."""
    expected = tiny_config().to_dict()
    monkeypatch.setattr(configuration_casa, "SubConfigSpec", None)
    built = tiny_config()
    assert built.to_dict() == expected
    assert built.vision_config.depth == TINY_VISION["depth"]
    default = configuration_casa.CasaConfig()  # no text config at all: Qwen2.5-VL-7B's language model
    assert (default.text_config.model_type, default.text_config.hidden_size) == ("qwen2", 3584)
