"""Tokenizer loading, including the embedded byte-level fast tokenizer.

The embedded tokenizer needs no download: every byte is one token, so any text
round-trips exactly and the vocabulary is small enough for a tiny model.
Its ids are fixed: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2 and byte ``b`` = ``b + 3``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from stepwise_lit.data.sources import check_pretrained_source
from stepwise_lit.errors import SettingError

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
BYTE_TOKEN_OFFSET = len(SPECIAL_TOKENS)

BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    This is the alphabet the ``tokenizers`` ByteLevel pre-tokenizer produces.

    Returns:
        Byte value -> the one-character string that stands for it.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = dict(zip(printable, printable))
    shifted = 0
    for byte in range(256):
        if byte not in code_points:
            code_points[byte] = 256 + shifted
            shifted += 1
    return {byte: chr(code_point) for byte, code_point in sorted(code_points.items())}


def build_byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Build the embedded byte-level fast tokenizer locally.

    Tokens: ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), then the 256 bytes in byte
    order (ids 3..258). No merges, so a token is exactly one byte. Encoding a
    single text with special tokens prepends ``<s>``.

    Args:
        chat_template: Jinja chat template; None uses a minimal
            ``<|role|>\\ncontent\\n`` template.

    Returns:
        The tokenizer with pad, bos and eos tokens set.
    """
    vocab = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)}
    for byte, character in byte_to_unicode().items():
        vocab[character] = BYTE_TOKEN_OFFSET + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=chat_template or BYTE_CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids (transformers 4.x adds them)
    )


def load_tokenizer(
    name_or_path: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    setting: str = "tokenizer_name_or_path",
) -> PreTrainedTokenizerBase:
    """Load a tokenizer, or build the embedded byte-level one.

    Args:
        name_or_path: Hub id or local directory for ``AutoTokenizer``; None builds
            the embedded byte-level tokenizer (no download).
        trust_remote_code: Passed to ``AutoTokenizer.from_pretrained``; only set it
            for sources you trust.
        chat_template: Jinja chat template that replaces the tokenizer's own.
        setting: The setting `name_or_path` came from, as YAML names it (for errors).

    Returns:
        A tokenizer with a pad token (the eos token when the source has none).

    Raises:
        SettingError: naming `setting`, when the tokenizer cannot be found or loaded.
        ValueError: If the loaded tokenizer has neither a pad nor an eos token.
    """
    if name_or_path is None:
        return build_byte_tokenizer(chat_template)
    check_pretrained_source(setting, name_or_path, "tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # missing files; a folder without a tokenizer
        raise SettingError(f"{setting}: cannot load a tokenizer from {name_or_path!r}: {error}") from error
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
