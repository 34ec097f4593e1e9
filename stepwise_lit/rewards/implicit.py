"""ImplicitStepScorer: a trained policy and its reference as a process reward model.

A DPO-trained policy π and its reference π_ref define the implicit step reward of step t
of a response: ``h_t = β (log π(step_t | prompt, steps_<t) − log π_ref(step_t | prompt, steps_<t))``,
the reward the stepwise loss trained (docs/loss.md, "Rewards and aggregation"). Both log-probs come from one forward
pass per model per batch (`stepwise_lit.logprobs.forward.step_logps`) over the response tokenized as
the data side tokenizes a training side (`stepwise_lit.data.tokenize.tokenize_response`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepwise_lit.data.chat import prompt_format_of
from stepwise_lit.data.collate import right_pad
from stepwise_lit.data.records import Prompt
from stepwise_lit.data.tokenize import tokenize_response
from stepwise_lit.logprobs.forward import step_logps
from stepwise_lit.models.export import MARKER
from stepwise_lit.objective.stepwise import per_token_step_rewards
from stepwise_lit.rewards.base import (
    StepScorer,
    length_sorted_batches,
    load_pretrained,
    model_device,
    set_pad_token,
)

logger = logging.getLogger("stepwise_lit")

ADAPTER_FOLDER = "adapter"
"""Where an export with LoRA keeps the adapter (`stepwise_lit.models.export.write_export`)."""


@dataclass(frozen=True)
class StepLogProbs:
    """Per-step log-probs of N responses under the policy and the reference (S: most steps).

    Attributes:
        policy: float ``[N, S]``, log π(step t | prefix); 0 past a response's last step.
        reference: float ``[N, S]``, log π_ref(step t | prefix); 0 past a response's last step.
        token_counts: long ``[N, S]``, tokens of step t (EOS counts with the last step).
        step_mask: bool ``[N, S]``, True at a response's real steps.
    """

    policy: torch.Tensor
    reference: torch.Tensor
    token_counts: torch.Tensor
    step_mask: torch.Tensor


def implicit_step_rewards(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, token_counts: torch.Tensor, beta: float, per_token: bool
) -> torch.Tensor:
    """The implicit step rewards h_t = β (log π(step t) − log π_ref(step t)), or per token h_t / n_t.

    Args:
        policy_logps: float ``[N, S]`` policy log-probs of each step's tokens.
        reference_logps: float ``[N, S]`` reference log-probs of the same tokens.
        token_counts: long ``[N, S]`` tokens per step, n_t (a step without tokens, whose log-probs sum to 0, gets 0).
        beta: β, the scale of the step reward.
        per_token: Divide h_t by n_t (the step's mean per-token log-ratio, times β).

    Returns:
        float ``[N, S]``.
    """
    rewards = beta * (policy_logps - reference_logps)
    return per_token_step_rewards(rewards, token_counts) if per_token else rewards


def squash(rewards: torch.Tensor, scale: float) -> torch.Tensor:
    """Maps rewards of any size into (-1, 1): ``tanh(rewards / scale)``, monotone, 0 at 0.

    Args:
        rewards: float ``[...]``.
        scale: The reward size that maps to tanh(1) ≈ 0.76; > 0.
    """
    return torch.tanh(rewards / scale)


def read_export_config(folder: str) -> dict:
    """The `stepwise_config.json` of an export of this package, or {} for any other model source."""
    marker = Path(folder).expanduser() / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


def default_reference(export_config: dict, source: str) -> str:
    """The model the export's policy was trained against, when the user names none.

    That is the run's `ref_model_name_or_path`, else the `model_name_or_path` it started from:
    the reference of ``reference: copy``, ``precomputed`` and ``adapter`` (with LoRA: the base,
    the adapter disabled).

    Raises:
        ValueError: Naming ``ref_model_name_or_path`` when the export does not say, or the
            reference was never saved (an SFT warm-up re-freezes it from the policy; the embedded
            tiny model starts from random weights; ``reference: none`` has none).
    """
    fix = "set ref_model_name_or_path to the model the policy was trained against"
    if not export_config:
        raise ValueError(f"ref_model_name_or_path: {source} is not an export of stepwise_lit (no {MARKER}); {fix}")
    if export_config.get("reference") == "none":
        raise ValueError(f"ref_model_name_or_path: {source} was trained with reference: none; {fix}")
    if export_config.get("sft_warmup_steps"):
        raise ValueError(
            f"ref_model_name_or_path: {source} was trained with an SFT warm-up, whose end-of-warm-up reference "
            f"is not part of the export; {fix} (e.g. an export of the warm-up alone)"
        )
    reference = export_config.get("ref_model_name_or_path") or export_config.get("model_name_or_path")
    if reference is None:
        raise ValueError(
            f"ref_model_name_or_path: {source} was trained from the embedded tiny model, whose initial weights "
            f"are not saved; {fix}"
        )
    return reference


class ImplicitStepScorer(StepScorer):
    """Scores each step with the implicit step reward of a trained policy and its reference.

    ``h_t = β (log π(step_t | prefix) − log π_ref(step_t | prefix))`` (`implicit_step_rewards`), or
    with `per_token` its per-token form ``h_t / n_t``; the score is ``tanh(h_t / scale)`` (`squash`),
    in (-1, 1) as the data contract asks. `raw_step_rewards` gives h_t itself, for ranking.

    A response is tokenized as a training side is: the prompt (rendered as the export's run rendered
    it: step-wise template, chat template, system prompt, `stepwise_lit.data.chat`; cut from the left
    to the run's ``data.max_prompt_length``, cut prompts counted in the log), every step, then EOS,
    which counts with the last step. Responses are run longest first, `batch_size` at a time, one
    forward pass per model per batch.

    The reference, when `ref_model_name_or_path` is not set: an export with only a LoRA adapter
    (``adapter/`` and no merged weights) is loaded as the adapter's base + adapter, and the same
    model with the adapter disabled is the reference (one model in memory). Otherwise the run's
    own reference (`default_reference`: its ``ref_model_name_or_path``, else the base it started
    from), and an error when the export cannot tell (SFT warm-up, embedded tiny model).
    """

    def __init__(
        self,
        model_name_or_path: str,
        ref_model_name_or_path: str | None = None,
        step_beta: float | None = None,
        per_token: bool = False,
        scale: float = 1.0,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        progress: bool = True,
    ) -> None:
        """Loads the policy and the reference.

        Args:
            model_name_or_path: The trained policy: an export folder of this package (its
                ``stepwise_config.json`` gives β and the prompt settings) or any causal LM.
            ref_model_name_or_path: The reference causal LM; None: see the class docstring.
            step_beta: β; None: the export's ``step_beta`` (then required for another source).
            per_token: Score h_t / n_t (n_t: the step's tokens) instead of h_t.
            scale: h_t (or h_t / n_t) that maps to tanh(1) ≈ 0.76; pick it near the size of
                typical rewards so scores do not saturate at ±1.
            batch_size: Responses per forward pass.
            trust_remote_code: Run the model repository's own code; only for sources you trust.
            dtype: Weight dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
            progress: Show a progress bar over the batches of a call with more than one batch.

        Raises:
            ValueError: For β, scale or batch_size out of range, or a reference that cannot be
                found (see `default_reference`).
            OSError: If a model cannot be loaded (FileNotFoundError for a missing local folder).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        export_config = read_export_config(model_name_or_path)
        beta = step_beta if step_beta is not None else export_config.get("step_beta")
        if beta is None:
            raise ValueError(f"step_beta: {model_name_or_path} is not an export of stepwise_lit (no {MARKER}); set it")
        if beta <= 0:
            raise ValueError(f"step_beta must be > 0, got {beta}")
        adapter = Path(model_name_or_path).expanduser() / ADAPTER_FOLDER
        adapter_only = (adapter / "adapter_config.json").is_file() and not (
            Path(model_name_or_path).expanduser() / "config.json"
        ).is_file()
        if adapter_only:
            self.policy, self.tokenizer = load_adapter_policy(adapter, model_name_or_path, trust_remote_code, dtype)
        else:
            self.policy, self.tokenizer = load_pretrained(
                AutoModelForCausalLM, model_name_or_path, trust_remote_code, dtype, type(self).__name__
            )
        self.reference = None  # None: the policy with its adapter disabled
        if ref_model_name_or_path is not None or not adapter_only:
            source = ref_model_name_or_path or default_reference(export_config, model_name_or_path)
            self.reference, _ = load_pretrained(AutoModelForCausalLM, source, trust_remote_code, dtype, type(self).__name__)
            check_same_vocabulary(self.policy, self.reference, source)
        data = export_config.get("data") or {}
        self.max_prompt_length = data.get("max_prompt_length")
        self.prompt_format = prompt_format_of(data)
        self.beta = float(beta)
        self.per_token = per_token
        self.scale = scale
        self.batch_size = batch_size
        self.progress = progress

    def _score_steps(
        self, prompts: list[Prompt], steps: list[list[str]], reference_solutions: list[str | None]
    ) -> list[list[float]]:
        log_probs = self.step_log_probs(prompts, steps)
        return rows_of(squash(self.rewards_of(log_probs), self.scale), log_probs.step_mask)

    def raw_step_rewards(self, prompts: Sequence[Prompt], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        """h_t (or h_t / n_t with `per_token`) of each step of each response, unsquashed.

        Args:
            prompts: One problem per response.
            steps: One non-empty list of step texts per response.

        Returns:
            One list per response with one reward per step.
        """
        log_probs = self.step_log_probs(prompts, steps)
        return rows_of(self.rewards_of(log_probs), log_probs.step_mask)

    def rewards_of(self, log_probs: StepLogProbs) -> torch.Tensor:
        """The rewards ``[N, S]`` this scorer's settings (β, `per_token`) give for `log_probs`."""
        return implicit_step_rewards(
            log_probs.policy, log_probs.reference, log_probs.token_counts, self.beta, self.per_token
        )

    @torch.no_grad()
    def step_log_probs(self, prompts: Sequence[Prompt], steps: Sequence[Sequence[str]]) -> StepLogProbs:
        """Per-step log-probs of each response under the policy and the reference.

        Args:
            prompts: One problem per response.
            steps: One non-empty list of step texts per response.

        Returns:
            `StepLogProbs` with N = len(prompts) rows, in the order given.

        Raises:
            ValueError: If the lengths differ or a response has no steps.
        """
        if len(prompts) != len(steps) or any(len(row_steps) == 0 for row_steps in steps):
            raise ValueError("step_log_probs needs one non-empty step list per prompt")
        encoded = [
            tokenize_response(prompt, list(row_steps), self.tokenizer, self.max_prompt_length, self.prompt_format)
            for prompt, row_steps in zip(prompts, steps)
        ]
        cut = sum(prompt_cut for _, _, prompt_cut in encoded)
        if cut:
            logger.info("implicit scorer: cut %d of %d prompts from the left to max_prompt_length %d (as in training)",
                        cut, len(encoded), self.max_prompt_length)
        width = max(len(row_steps) for row_steps in steps)
        result = {key: torch.zeros(len(steps), width) for key in ("policy", "reference")}
        token_counts = torch.zeros(len(steps), width, dtype=torch.long)
        batches = length_sorted_batches([len(ids) for ids, _, _ in encoded], self.batch_size)
        for indices in tqdm(batches, desc="implicit step rewards", disable=not self.progress or len(batches) < 2,
                            leave=False):
            batch = self.side_batch([encoded[i] for i in indices])
            num_steps = max(len(steps[i]) for i in indices)
            for key, logps in zip(("policy", "reference"), self.forward_both(batch, num_steps)):
                result[key][indices, :num_steps] = logps.float().cpu()
            counts = torch.nn.functional.one_hot(batch["step_ids"][:, 1:], num_steps + 1)[..., 1:].sum(1)  # [b, S]
            token_counts[indices, :num_steps] = counts.cpu()
        step_mask = torch.arange(width)[None, :] < torch.tensor([len(row_steps) for row_steps in steps])[:, None]
        return StepLogProbs(result["policy"], result["reference"], token_counts, step_mask)

    def side_batch(self, encoded: list[tuple[list[int], list[int], bool]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``step_ids`` ``[b, L]`` on the policy's device:
        the layout of `stepwise_lit.logprobs.forward.chosen_side`, which `step_logps` takes."""
        device = model_device(self.policy)
        return {
            "input_ids": right_pad([ids for ids, _, _ in encoded], self.tokenizer.pad_token_id).to(device),
            "attention_mask": right_pad([[1] * len(ids) for ids, _, _ in encoded], 0).to(device),
            "step_ids": right_pad([step_ids for _, step_ids, _ in encoded], 0).to(device),
        }

    def forward_both(self, batch: dict[str, torch.Tensor], num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference step log-probs ``[b, S]`` of a side batch, one forward pass each."""
        policy = step_logps(self.policy, batch, num_steps)
        if self.reference is not None:
            return policy, step_logps(self.reference, batch, num_steps)
        with self.policy.disable_adapter():
            return policy, step_logps(self.policy, batch, num_steps)


def check_same_vocabulary(policy: torch.nn.Module, reference: torch.nn.Module, source: str) -> None:
    """Fails unless the two models' output vocabularies have the same size (a reference with another
    tokenizer would score other tokens than the policy's).

    Raises:
        ValueError: Naming ``ref_model_name_or_path``.
    """
    sizes = [model.get_output_embeddings().weight.shape[0] for model in (policy, reference)]
    if sizes[0] != sizes[1]:
        raise ValueError(
            f"ref_model_name_or_path: {source} has a {sizes[1]}-token vocabulary, the policy {sizes[0]}: "
            "the reference must share the policy's tokenizer"
        )


def rows_of(values: torch.Tensor, step_mask: torch.Tensor) -> list[list[float]]:
    """The real steps' values of ``[N, S]`` `values` as one list per response."""
    return [row[mask].tolist() for row, mask in zip(values, step_mask)]


def load_adapter_policy(adapter: Path, source: str, trust_remote_code: bool, dtype: str):
    """The policy of an adapter-only LoRA export: its base model with the adapter, and the export's tokenizer.

    Raises:
        ValueError: If the adapter names no base model (the embedded tiny model's is not saved).
    """
    from peft import PeftModel

    base_source = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_source:
        raise ValueError(
            f"model_name_or_path: {source} holds only a LoRA adapter whose base model is not saved (the embedded "
            "tiny model); export with lora.merge_on_export: true"
        )
    base, _ = load_pretrained(AutoModelForCausalLM, base_source, trust_remote_code, dtype, "ImplicitStepScorer")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    set_pad_token(tokenizer, base, source)
    return PeftModel.from_pretrained(base, adapter).eval().requires_grad_(False), tokenizer
