import pytest

from jarvis_prime.models.chat_template import ChatTemplate, ChatTemplateError

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are JARVIS."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? ünïcode ✓"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renderer_matches_transformers_apply_chat_template(pulled_model, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    ours = ChatTemplate((pulled_model.path / "chat_template.jinja").read_text(),
                        {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token})
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_default_system_prompt_of_the_template_is_used(llama_model):
    prompt = llama_model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, where", [
    ([], "at least one message"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], r"messages\[1\].content"),
])
def test_bad_messages_name_the_message(messages, where):
    with pytest.raises(ChatTemplateError, match=where):
        ChatTemplate("{{ messages }}", {}).render(messages)


def test_template_raise_exception_becomes_a_clear_error():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])
