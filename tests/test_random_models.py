"""The random CASA / Qwen2.5-VL / text-LLM twins of the benchmarks have configs consistent with their tokenizer."""

from casa_hf.random_models import random_casa, random_qwen2_5_vl, random_text_llm, word_tokenizer


def test_token_ids_of_every_twin_lie_in_its_vocabulary():
    tokenizer = word_tokenizer(256)
    for model in (
        random_casa("tiny", tokenizer),
        random_qwen2_5_vl("tiny", tokenizer),
        random_text_llm("tiny", tokenizer),
    ):
        text = model.config.get_text_config()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            for config in (text, model.generation_config):
                value = getattr(config, name)
                assert value is None or 0 <= value < len(tokenizer), (type(model).__name__, name, value)
