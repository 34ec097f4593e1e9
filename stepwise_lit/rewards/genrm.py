"""GenerativeStepScorer: a causal LM asked "is this step correct?" (GenRM, arXiv:2408.15240)."""

from __future__ import annotations

import inspect
import string

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from stepwise_lit.data.records import Prompt
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.models.loading import TinyModelConfig, build_tiny_model
from stepwise_lit.rewards.base import StepScorer, load_pretrained, logger, prompt_text
from stepwise_lit.rewards.batching import padded_batches

DEFAULT_TEMPLATE = (
    "Below are a math problem, the steps of a solution so far, and the solution's next step.\n\n"
    "Problem:\n{problem}\n\n"
    "Previous steps:\n{previous_steps}\n\n"
    "Next step:\n{step}\n\n"
    "Is the next step correct? Answer Yes or No."
)
TEMPLATE_FIELDS = frozenset({"problem", "previous_steps", "step"})
NO_PREVIOUS_STEPS = "(none)"
TINY_MODEL_SEED = 0
EMBEDDED_VERIFIER = "embedded"
"""The `model_name_or_path` that builds the embedded tiny random verifier."""


def check_template(template: str) -> None:
    """Checks that a verification template has a ``{step}`` field and no unknown fields.

    Raises:
        ValueError: If ``{step}`` is missing, a field is not one of ``problem``,
            ``previous_steps``, ``step``, or the braces do not parse (write a
            literal brace as ``{{`` or ``}}``).
    """
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(
            f"template does not parse as a format string ({error}); write literal braces as {{{{ }}}}"
        ) from error
    if "step" not in fields:
        raise ValueError("template has no {step} field: the scorer would not show the model the step it judges")
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"template has unknown fields {sorted(unknown)}; allowed: {sorted(TEMPLATE_FIELDS)}")


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, word: str) -> list[int]:
    """The vocabulary ids that spell `word` as one token: ``word``, ``" " + word`` and
    the SentencePiece (``▁``) and byte-level BPE (``Ġ``) space-prefixed forms.

    Raises:
        ValueError: If no form of `word` is a single token.
    """
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in (word, "▁" + word, "Ġ" + word) if token in vocab}
    for variant in (word, " " + word):
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
    if not ids:
        raise ValueError(
            f"the tokenizer has no single token for {word!r} (tried {word!r} and {' ' + word!r}): the scorer reads "
            "P(Yes) from the next-token distribution, so pick yes_token / no_token that are single tokens"
        )
    return sorted(ids)


def build_tiny_verifier(yes_token: str, no_token: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The embedded demo verifier: the byte-level tokenizer with `yes_token` and
    `no_token` added as single tokens, and a small random Llama causal LM (seed 0).
    Its scores are plumbing only, not judgements."""
    tokenizer = load_tokenizer(None)
    tokenizer.add_tokens([yes_token, no_token])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODEL_SEED)
        shape = TinyModelConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=4096)
        model = build_tiny_model(tokenizer, shape)
    model.eval().requires_grad_(False)
    return model, tokenizer


class GenerativeStepScorer(StepScorer):
    """Scores step k with a causal LM's answer to "is step k correct, given the problem
    and steps 1..k-1?": p = P(Yes) / (P(Yes) + P(No)) from the next-token
    distribution, score = 2p - 1.

    P(Yes) sums the probabilities of every single-token form of `yes_token` (with and
    without a leading space; likewise for No). The question is `template` filled
    with ``{problem}``, ``{previous_steps}`` (the earlier steps' text, stripped, or
    "(none)") and ``{step}`` (stripped), sent as one user message through the
    tokenizer's chat template when it has one (the model's answer then starts the
    assistant turn); otherwise the filled template is the whole text, so for a base
    model end the template with something like ``"\\nAnswer:"``.

    With ``num_rationales = K > 0`` (GenRM-CoT) the model first samples K verification
    rationales after `rationale_prompt`, then `verdict_prompt` is appended to each and
    p is the mean over the K verdicts. K = 0 reads the verdict directly.

    All queries of a call (every step of every response) are sorted by length, left
    padded and run `batch_size` at a time; only the last position's logits are
    computed where the model supports ``logits_to_keep``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        template: str = DEFAULT_TEMPLATE,
        use_chat_template: bool = True,
        yes_token: str = "Yes",
        no_token: str = "No",
        num_rationales: int = 0,
        rationale_prompt: str = "Let's verify step by step.",
        verdict_prompt: str = "\nIs the step correct (Yes/No)?",
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        dtype: str = "auto",
    ) -> None:
        """Loads the verifier model and checks the settings.

        Args:
            model_name_or_path: Hugging Face causal LM (local folder or Hub id in the
                local cache), or ``"embedded"`` for the embedded tiny random verifier
                (demos and tests only; its scores mean nothing). Required: a config
                that leaves it out fails rather than score with the random model.
            template: The verification question, with ``{step}`` and optionally
                ``{problem}`` and ``{previous_steps}``; literal braces doubled.
            use_chat_template: Wrap the question in the tokenizer's chat template when it has one.
            yes_token: The word whose probability means "correct"; must be one token.
            no_token: The word whose probability means "incorrect"; must be one token.
            num_rationales: K sampled verification rationales per step (GenRM-CoT); 0 answers directly.
            rationale_prompt: Text after the question that starts a rationale (K > 0).
            verdict_prompt: Text after a rationale that asks for the Yes/No verdict (K > 0).
            max_new_tokens: Longest rationale, in tokens (K > 0).
            temperature: Sampling temperature of the rationales (K > 0).
            batch_size: Sequences per forward pass (a generate call takes
                ``max(1, batch_size // K)`` queries).
            trust_remote_code: Run the model repository's own code; only for sources you trust.
            dtype: Weight dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".

        Raises:
            ValueError: On a template without ``{step}``, Yes/No words that are not
                single tokens, or out-of-range numbers.
            OSError: If the model cannot be loaded (FileNotFoundError for a missing local folder).
        """
        super().__init__()
        check_template(template)
        if num_rationales < 0 or batch_size < 1 or max_new_tokens < 1 or temperature <= 0:
            raise ValueError(
                "need num_rationales >= 0, batch_size >= 1, max_new_tokens >= 1 and temperature > 0; got "
                f"{num_rationales}, {batch_size}, {max_new_tokens}, {temperature}"
            )
        if model_name_or_path == EMBEDDED_VERIFIER:
            logger.warning("GenerativeStepScorer: model_name_or_path is %r, the tiny random demo verifier", EMBEDDED_VERIFIER)
            self.model, self.tokenizer = build_tiny_verifier(yes_token, no_token)
        else:
            self.model, self.tokenizer = load_pretrained(
                AutoModelForCausalLM, model_name_or_path, trust_remote_code, dtype, type(self).__name__
            )
        self.yes_ids = answer_token_ids(self.tokenizer, yes_token)
        self.no_ids = answer_token_ids(self.tokenizer, no_token)
        shared = set(self.yes_ids) & set(self.no_ids)
        if shared:
            raise ValueError(f"yes_token and no_token share token ids {sorted(shared)}")
        self.template = template
        self.use_chat_template = use_chat_template and self.tokenizer.chat_template is not None
        self.num_rationales = num_rationales
        self.rationale_ids = self.tokenizer.encode(rationale_prompt, add_special_tokens=False)
        self.verdict_ids = self.tokenizer.encode(verdict_prompt, add_special_tokens=False)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.keeps_last_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _score_steps(
        self, prompts: list[Prompt], steps: list[list[str]], reference_solutions: list[str | None]
    ) -> list[list[float]]:
        queries = [
            self.query_ids(prompt, row_steps, index)
            for prompt, row_steps in zip(prompts, steps)
            for index in range(len(row_steps))
        ]
        if self.num_rationales == 0:
            probabilities = self.yes_probabilities(queries)
        else:
            probabilities = self.rationale_yes_probabilities(queries)
        flat = iter(2.0 * p - 1.0 for p in probabilities)
        return [[next(flat) for _ in row_steps] for row_steps in steps]

    def query_ids(self, prompt: Prompt, steps: list[str], index: int) -> list[int]:
        """Token ids of the question about ``steps[index]``, ending where the model answers."""
        question = self.template.format(
            problem=prompt_text(prompt).strip(),
            previous_steps="".join(steps[:index]).strip() or NO_PREVIOUS_STEPS,
            step=steps[index].strip(),
        )
        if not self.use_chat_template:
            return self.tokenizer(question)["input_ids"]
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def yes_probabilities(self, sequences: list[list[int]]) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) for the token after each sequence, in input order."""
        probabilities = [0.0] * len(sequences)
        batches = padded_batches(self.model, sequences, self.batch_size, self.tokenizer.pad_token_id, "left")
        for batch, inputs in batches:
            if self.keeps_last_logits:
                inputs["logits_to_keep"] = 1
            logits = self.model(**inputs, use_cache=False).logits[:, -1].float()
            for i, p in zip(batch, self.verdict_probability(logits).tolist()):
                probabilities[i] = p
        return probabilities

    def verdict_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """sigmoid(logsumexp(Yes logits) - logsumexp(No logits)) = P(Yes) / (P(Yes) + P(No)). [N]"""
        yes = logits[:, self.yes_ids].logsumexp(-1)
        no = logits[:, self.no_ids].logsumexp(-1)
        return torch.sigmoid(yes - no)

    def rationale_yes_probabilities(self, queries: list[list[int]]) -> list[float]:
        """GenRM-CoT: per query, K sampled rationales each followed by the verdict
        prompt; the mean verdict probability, in input order."""
        prefixes = [query + self.rationale_ids for query in queries]
        rationales = self.sample_rationales(prefixes)
        verdicts = [
            prefixes[i] + rationale + self.verdict_ids
            for i in range(len(prefixes))
            for rationale in rationales[i]
        ]
        flat = self.yes_probabilities(verdicts)
        k = self.num_rationales
        return [sum(flat[i * k : (i + 1) * k]) / k for i in range(len(queries))]

    def sample_rationales(self, prefixes: list[list[int]]) -> list[list[list[int]]]:
        """K sampled continuations of each prefix, cut before the first eos/pad token."""
        k = self.num_rationales
        rationales: list[list[list[int]]] = [[] for _ in prefixes]
        stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}
        batch_size = max(1, self.batch_size // k)
        for batch, inputs in padded_batches(self.model, prefixes, batch_size, self.tokenizer.pad_token_id, "left"):
            generated = self.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                do_sample=True,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=k,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )[:, inputs["input_ids"].shape[1] :].tolist()
            for j, tokens in enumerate(generated):
                cut = next((t for t, token in enumerate(tokens) if token in stop_ids), len(tokens))
                rationales[batch[j // k]].append(tokens[:cut])
        return rationales
