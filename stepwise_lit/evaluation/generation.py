"""Does the policy solve more problems? Generation-based evaluation in ``validate``/``test`` and as a command.

:class:`SolveRateEvaluation` (a callback, settings under ``evaluation``) decodes the
policy on the validation split's distinct prompts once per ``validate``/``test`` run,
extracts each completion's final answer (:mod:`stepwise_lit.grading.answers`) and grades it
against the problem's reference answer (:func:`reference_answer`): ``solve_rate`` (greedy
pass@1), and with ``generation.num_samples`` k > 1 (sampling) ``pass_at_k`` and
``maj_at_k``. With a ``verifier`` (any ``StepScorer``, e.g. the rule verifier for
arithmetic) it also scores the generated steps: the share it flags (score < 0), the
share of solutions with a flagged step, and the mean 1-based position of the first
flagged step. Values are logged as ``val/solve_rate`` ... (``test/...``), so they land in
``metrics.csv``, and :class:`~stepwise_lit.evaluation.report.StepRewardReport` puts them in
``report.json`` with a plot.

``python -m stepwise_lit.evaluate`` does the same for an
exported model or a training checkpoint and a data file, and writes ``<output>/report.json``.

Generated solutions are split into steps by :func:`stepwise_lit.evaluation.rerank.split_solution` (at
``generation.step_end``, blank pieces joined to a neighbour so the steps give the text back),
as rerank and the online rounds split them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import get_args

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics.aggregation import SumMetric

from stepwise_lit.data.heldout import Problem, held_out_problems
from stepwise_lit.data.sampling import PaddedShardSampler
from stepwise_lit.errors import SettingError
from stepwise_lit.evaluation.preference import WeightedMean
from stepwise_lit.evaluation.rerank import split_solution
from stepwise_lit.evaluation.solve_rate import MajorityAtK, PassAtK, SolveRate
from stepwise_lit.evaluation.values import json_count, json_number
from stepwise_lit.grading.answers import AnswerSourceName, announce_grader, extract_answer
from stepwise_lit.models.distributed import shows_progress
from stepwise_lit.models.generate import GenerationSettings, Generator, generator_class
from stepwise_lit.rewards.base import StepScorer

log = logging.getLogger("stepwise_lit")

NUM_EXAMPLES = 3  # completions shown in the report


class GenerationMetrics(torch.nn.Module):
    """Solve rates and verifier flags of generated solutions, synced across ranks by torchmetrics.

    Args:
        source: How answers are extracted and compared.
        num_samples: Completions per prompt; pass@k and maj@k (k = ``num_samples``) when above 1.
    """

    def __init__(self, source: AnswerSourceName, num_samples: int) -> None:
        super().__init__()
        self.source = source
        self.num_samples = num_samples
        self.solve_rate = SolveRate(source)
        self.pass_at_k = PassAtK(num_samples, source)
        self.maj_at_k = MajorityAtK(source)
        self.num_prompts = SumMetric(nan_strategy="disable")
        self.flagged_step_share = WeightedMean()
        self.flagged_solution_share = WeightedMean()
        self.first_flagged_step = WeightedMean()

    def update(
        self,
        problems: Sequence[Problem],
        completions: Sequence[Sequence[str]],
        weights: torch.Tensor,
        verifier: StepScorer | None = None,
        step_end: str = "\n",
    ) -> None:
        """Grade N prompts' completions.

        Args:
            problems: N problems.
            completions: Per problem, its ``num_samples`` completions; the first is the one
                ``solve_rate`` grades (the greedy one when decoding greedily).
            weights: ``[N]`` prompt weights (0: a distributed shard's padding).
            verifier: Scores the completions' steps (``split_solution`` at ``step_end``); None: no flags.
            step_end: The text that ends a step.
        """
        answers = [[extract_answer(text, self.source) for text in samples] for samples in completions]
        references = [problem.answer for problem in problems]
        self.solve_rate.update([samples[0] for samples in answers], references, weights)
        self.num_prompts.update(weights.float().sum())
        if self.num_samples > 1:
            self.pass_at_k.update(answers, references, weights)
            self.maj_at_k.update(answers, references, weights)
        if verifier is not None:
            self.update_flags(problems, completions, weights, verifier, step_end)

    def update_flags(
        self,
        problems: Sequence[Problem],
        completions: Sequence[Sequence[str]],
        weights: torch.Tensor,
        verifier: StepScorer,
        step_end: str,
    ) -> None:
        """Scores every completion's steps in one call; an empty completion is one empty step."""
        responses = [
            (problem, split_solution(text, step_end), torch.tensor(weight))
            for problem, samples, weight in zip(problems, completions, weights.tolist())
            for text in samples
        ]
        scores = verifier.score_steps(
            [problem.prompt for problem, _, _ in responses], [steps for _, steps, _ in responses],
            [problem.solution for problem, _, _ in responses],
        )
        for (_, _, weight), step_scores in zip(responses, scores):
            flags = torch.tensor([score < 0 for score in step_scores])
            self.flagged_solution_share.update(flags.any().float(), weight)
            self.flagged_step_share.update(flags.float(), weight)
            if flags.any():
                self.first_flagged_step.update(flags.long().argmax().float() + 1, weight)

    def compute(self, with_flags: bool) -> dict[str, float | int | None]:
        """The values (every rank takes part): ``num_prompts``, ``k``, ``solve_rate``,
        ``pass_at_k`` and ``maj_at_k`` (None when k = 1), and with flags ``flagged_step_share``,
        ``flagged_solution_share`` and ``first_flagged_step`` (None where nothing was counted)."""
        sampled = self.num_samples > 1
        values = {
            "num_prompts": json_count(self.num_prompts.compute()),
            "k": self.num_samples,
            "solve_rate": json_number(self.solve_rate.compute()),
            "pass_at_k": json_number(self.pass_at_k.compute()) if sampled else None,
            "maj_at_k": json_number(self.maj_at_k.compute()) if sampled else None,
        }
        if with_flags:
            for name in ("flagged_step_share", "flagged_solution_share", "first_flagged_step"):
                values[name] = json_number(getattr(self, name).compute())
        return values

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def evaluate_problems(
    generator: Generator,
    problems: Sequence[Problem],
    weights: torch.Tensor,
    settings: GenerationSettings,
    metrics: GenerationMetrics,
    verifier: StepScorer | None,
) -> list[list[str]]:
    """Generates for ``problems`` and updates ``metrics``; returns the completions."""
    completions = generator.generate([problem.prompt for problem in problems], settings) if problems else []
    metrics.update(problems, completions, weights, verifier, settings.step_end)
    return completions


def examples(problems: Sequence[Problem], completions: Sequence[Sequence[str]], source: AnswerSourceName) -> list[dict]:
    """The first :data:`NUM_EXAMPLES` problems with their first completion, its answer and the reference."""
    return [
        {"prompt": problem.prompt, "completion": samples[0], "answer": extract_answer(samples[0], source), "reference": problem.answer}
        for problem, samples in list(zip(problems, completions))[:NUM_EXAMPLES]
    ]


def refuse_fsdp1(trainer: L.Trainer, setting: str) -> None:
    """Generation runs in one process, under DDP and under FSDP2 (``ModelParallelStrategy``), not
    yet under FSDP1 (``FSDPStrategy``), whose wrapped root would have to be gathered around
    ``generate`` and which this package cannot run on the CPU to test.

    Raises:
        SettingError: Naming ``setting``, under ``FSDPStrategy``.
    """
    if isinstance(trainer.strategy, FSDPStrategy):
        raise SettingError(
            f"{setting}: generation does not run under FSDPStrategy (FSDP1); use ModelParallelStrategy "
            "(FSDP2, configs/fsdp.yaml), DDP or one process, or evaluate the exported model with "
            "python -m stepwise_lit.evaluate"
        )


class SolveRateEvaluation(L.Callback):
    """Greedy (or sampled) solutions of the validation split's prompts, graded at the start
    of every ``validate``/``test`` epoch (before the pair metrics; off during ``fit`` unless
    ``during_fit``).

    Prompts are the split's distinct prompts in order, at most ``max_prompts``, formatted and
    cut as training formats them (``data.use_step_wise_prompt``/``step_wise_prompt_template``,
    ``data.apply_chat_template``/``system_prompt``, ``data.max_prompt_length`` from the left).
    Under DDP and FSDP2 each rank generates its
    in-order share once; the shares are padded to equal length with repeats of weight 0
    (``data.sampling.PaddedShardSampler``), so the values equal one process's, and every rank
    runs as many ``generate`` batches, which a sharded policy decodes in lockstep
    (``stepwise_lit.models.generate``). Rank zero shows a progress bar over the batches while the
    trainer's progress bar is on. The results
    (:attr:`results`) go to the logger as ``<stage>/solve_rate``, ``<stage>/pass_at_k``,
    ``<stage>/maj_at_k`` and ``<stage>/flagged_step_share``, and into ``report.json``.

    Args:
        enabled: Generate at all. Off by default: decoding costs more than the pair metrics
            (configs/tiny.yaml's model, 64 prompts, one CPU core: 0.6 s for 64 new tokens each,
            1.1 s for 128; a trained model stops earlier, at its EOS).
        source: How final answers are read and compared: ``embedded`` (``The answer is N``),
            ``gsm8k`` (``#### N``, else the last number) or ``math`` (the last ``\\boxed{}``, graded
            by math-verify when the ``[math]`` extra is installed, else by a hand normaliser, with a
            warning at start: docs/evaluation.md). The reference answer is read the same way from
            the row's ``reference_solution``, else from its chosen solution (see `reference_answer`).
        max_prompts: Most distinct prompts evaluated (the first ones of the split); None: all.
        generation: How to decode (`stepwise_lit.models.generate.GenerationSettings`, set as
            ``evaluation.generation.max_new_tokens`` ...): greedy by default; ``do_sample: true``
            with ``num_samples: k`` adds pass@k and maj@k. Not changed by the callback.
        verifier: A step scorer (e.g. ``stepwise_lit.rewards.ArithmeticStepVerifier``) that
            flags generated steps (score < 0); None: no flag metrics.
        during_fit: Also evaluate at every validation during ``fit`` (not the sanity check),
            which logs ``val/solve_rate`` over training; costs the decoding time each time.
        generator: The decoding backend, as ``online.generator``: ``transformers``, ``vllm``
            (engine settings ``evaluation.generation.vllm``; docs/generation.md) or a backend
            class's import path. ``python -m stepwise_lit.evaluate`` reads it too.
    """

    def __init__(
        self,
        enabled: bool = False,
        source: AnswerSourceName = "embedded",
        max_prompts: int | None = 64,
        generation: GenerationSettings = GenerationSettings(),
        verifier: StepScorer | None = None,
        during_fit: bool = False,
        generator: str = "transformers",
    ) -> None:
        if source not in get_args(AnswerSourceName):
            raise SettingError(f"evaluation.source: unknown value {source!r}; choose one of {', '.join(get_args(AnswerSourceName))}")
        if max_prompts is not None and max_prompts < 1:
            raise SettingError(f"evaluation.max_prompts: must be at least 1 or null, got {max_prompts}")
        if enabled:
            announce_grader(source)
        self.enabled = enabled
        self.source = source
        self.max_prompts = max_prompts
        self.generation = generation
        self.verifier = verifier
        self.during_fit = during_fit
        self.generator_name = generator
        self.generator = generator_class(generator, "evaluation.generator") if enabled else None
        self.metrics = GenerationMetrics(source, self.generation.num_samples)
        self.results: dict | None = None

    def active(self, trainer: L.Trainer) -> bool:
        """Whether this epoch is evaluated."""
        if not self.enabled or trainer.sanity_checking:
            return False
        return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) or (
            self.during_fit and trainer.state.fn == TrainerFn.FITTING
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fails at start under FSDP1 (see `refuse_fsdp1`)."""
        if self.enabled:
            refuse_fsdp1(trainer, "evaluation.enabled")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module, "test")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Generates this rank's share, computes the global values into :attr:`results` and logs them."""
        self.results = None
        if not self.active(trainer):
            return
        datamodule = trainer.datamodule
        rows = datamodule.val_dataset
        if rows is None:
            log.warning("evaluation: no validation split, nothing to generate for")
            return
        problems, without_reference = held_out_problems(
            [json.loads(prompt) for prompt in rows["prompt_json"]], rows["reference_solution"], rows["chosen_steps"],
            self.source, self.max_prompts,
        )
        if without_reference:
            log.warning("evaluation: %d rows without a reference solution or chosen steps left out", without_reference)
        share = trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
        positions = list(PaddedShardSampler(problems, **share)) if problems else []
        mine = [problems[position % len(problems)] for position in positions]
        weights = torch.tensor([float(position < len(problems)) for position in positions])
        generator = self.generator(
            pl_module.policy, pl_module.tokenizer, datamodule.settings.prompt_format,
            datamodule.hparams.max_prompt_length, progress=shows_progress(trainer),
        )
        self.metrics.to(pl_module.device)  # torchmetrics syncs its states where they are (NCCL: on the GPU)
        self.metrics.reset()
        completions = evaluate_problems(generator, mine, weights, self.generation, self.metrics, self.verifier)
        self.results = {
            "source": self.source,
            **self.metrics.compute(with_flags=self.verifier is not None),
            "generation": asdict(self.generation),
            "examples": examples(mine, completions, self.source),
        }
        for name in ("solve_rate", "pass_at_k", "maj_at_k", "flagged_step_share"):
            if self.results.get(name) is not None:
                pl_module.log(f"{stage}/{name}", float(self.results[name]), sync_dist=True)
