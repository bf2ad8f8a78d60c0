"""The order casa_hf's vLLM plugin gives a chat before vLLM renders it (`casa_hf.vllm.chat`): pure functions, run
here without vLLM; test_vllm.py checks `LLM.chat`'s prompts against the processor's inside vLLM."""

from casa_hf.vllm.chat import group_image_parts, is_image_part


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def test_a_user_turns_image_parts_come_first_in_order():
    url = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    by_key = {"image_pil": object()}  # vLLM also takes a part that names its kind by key alone
    upload = {"type": "input_image", "image_url": "data:image/png;base64,BBBB"}
    turn = [text("first "), url, text("then "), by_key, text("and "), upload, text("what changed?")]
    reply = {"role": "assistant", "content": [text("a "), text("b")]}
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": turn}, reply]
    grouped = group_image_parts(chat)
    assert grouped[1]["content"] == [
        url,
        by_key,
        upload,
        text("first "),
        text("then "),
        text("and "),
        text("what changed?"),
    ]
    assert grouped[0] == chat[0] and grouped[2] == reply  # only user turns move
    assert chat[1]["content"] == turn  # the caller's messages are left as they were
    assert group_image_parts([chat, chat]) == [grouped, grouped]  # a batch of chats, as `LLM.chat` takes


def test_only_image_parts_count_as_images():
    assert is_image_part({"type": "image_embeds", "image_embeds": "..."})
    assert not is_image_part(text("image_url"))
    assert not is_image_part({"type": "video_url", "video_url": {"url": "x"}})
    assert not is_image_part("a bare string part")
