"""The embedded byte-level tokenizer and ``load_tokenizer``."""

from transformers import AutoTokenizer

from stepwise_lit.data.tokenizer import load_tokenizer


def test_byte_tokenizer_ids_are_bytes_plus_three():
    tokenizer = load_tokenizer()
    # "é" is the two bytes 0xC3 0xA9; <s> (id 1) is prepended.
    ids = tokenizer("hé\n")["input_ids"]
    assert ids == [1, ord("h") + 3, 0xC3 + 3, 0xA9 + 3, ord("\n") + 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 259


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = load_tokenizer()
    text = "Step 1: 12 + 7 = 19\n\nStep 2: ünïcode ✓ 😀\t  end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_chat_template():
    tokenizer = load_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n"


def test_byte_tokenizer_save_and_reload_with_auto_tokenizer(tmp_path):
    tokenizer = load_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Step 1: 3 * 4 = 12\n"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded.chat_template == tokenizer.chat_template


def test_load_tokenizer_sets_missing_pad_to_eos(tmp_path):
    tokenizer = load_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == "</s>"
    assert reloaded.pad_token_id == 2


def test_load_tokenizer_overrides_chat_template(tmp_path):
    load_tokenizer().save_pretrained(tmp_path)
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    reloaded = load_tokenizer(str(tmp_path), chat_template=template)
    assert reloaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
