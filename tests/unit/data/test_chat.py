"""`render_prompt`: the one rendering of a prompt, against hand-written Qwen2.5-style texts."""

from __future__ import annotations

import pytest

from stepwise_lit.data.chat import NoChatTemplate, PromptFormat, render_prompt
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.tokenizer import build_byte_tokenizer
from stepwise_lit.errors import SettingError
from tests.helpers.chat import QWEN_STYLE_TEMPLATE, qwen_style_text, save_model_folder

PROMPT = "What is 2 + 3?"


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_byte_tokenizer(QWEN_STYLE_TEMPLATE)


def test_string_prompt_goes_through_an_instruct_template_by_default(chat_tokenizer):
    assert render_prompt(PROMPT, chat_tokenizer, PromptFormat()) == qwen_style_text(PROMPT)
    assert render_prompt(PROMPT, chat_tokenizer, PromptFormat(apply_chat_template=False)) == PROMPT


def test_step_wise_template_then_system_prompt_then_chat(chat_tokenizer):
    prompt_format = PromptFormat("{prompt}\nStep by step.", system_prompt="Be brief.")
    assert render_prompt(PROMPT, chat_tokenizer, prompt_format) == qwen_style_text(f"{PROMPT}\nStep by step.", "Be brief.")


def test_messages_get_the_system_prompt_only_without_their_own(chat_tokenizer):
    user = [{"role": "user", "content": PROMPT}]
    own = [{"role": "system", "content": "Mine."}, *user]
    prompt_format = PromptFormat(system_prompt="Be brief.")
    assert render_prompt(user, chat_tokenizer, prompt_format) == qwen_style_text(PROMPT, "Be brief.")
    assert render_prompt(own, chat_tokenizer, prompt_format) == qwen_style_text(PROMPT, "Mine.")


def test_the_embedded_byte_template_is_off_by_default_and_on_when_asked():
    tokenizer = build_byte_tokenizer()
    assert render_prompt(PROMPT, tokenizer, PromptFormat()) == PROMPT
    assert render_prompt(PROMPT, tokenizer, PromptFormat(apply_chat_template=True)) == f"<s><|user|>\n{PROMPT}\n<|assistant|>\n"


def test_messages_without_a_chat_template_name_the_tokenizer_setting():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(NoChatTemplate, match=r"^data.tokenizer_name_or_path .*no chat template, and a prompt is chat messages"):
        render_prompt([{"role": "user", "content": PROMPT}], tokenizer, PromptFormat())


def test_settings_the_tokenizer_cannot_honour_stop_at_start(tmp_path):
    folder = save_model_folder(tmp_path / "plain", chat_template=None)
    with pytest.raises(SettingError, match=f"^data.tokenizer_name_or_path .*'{folder}'.*data.apply_chat_template is true"):
        StepwiseDataModule(tokenizer_name_or_path=folder, apply_chat_template=True, cache_dir=str(tmp_path))
    with pytest.raises(SettingError, match="^data.system_prompt: set, but string prompts are not rendered"):
        StepwiseDataModule(system_prompt="Be brief.", cache_dir=str(tmp_path))
