"""Online stepwise DPO inside ``fit``: each training epoch from ``start_epoch`` on is one round.

:class:`OnlineRounds` (a callback, settings under ``online``) runs generate → verify → pair
→ train with the trainer's own loop. Before the epoch of round ``r`` (at the end of the
previous epoch, or at the start of ``fit`` when a run starts or resumes in a round), the
policy samples ``generation.num_samples`` solutions for ``prompts_per_round`` prompts of the
training split, the ``verifier`` scores every step, pairs are built by ``pairs.strategy``,
and the round is written to ``<default_root_dir>/online/round-<r>/`` (``solutions.jsonl``,
then ``pairs.jsonl``; :mod:`stepwise_lit.online.rounds`). The data module is then handed the
path of ``pairs.jsonl`` (``StepwiseDataModule.train_on_round``), so the model side never
passes rows in memory to the data side, and the epoch trains ``steps_per_round`` batches
on them. The reference stays fixed, or is re-frozen from the policy at the start of every
``reference_refresh_rounds``-th round.

Resuming (``--ckpt_path last``): a round on disk is read back, never generated twice; a
round killed between its solutions and its pairs gets its pairs built from the written
solutions; the resumed epoch skips the batches already trained (``ResumableDataLoader``).
Under DDP and FSDP2 each rank samples its share of the round's prompts (every ``world_size``-th),
rank 0 writes the round, and every rank trains on all its pairs (each its share of batches).
Under FSDP2 the shares are decoded at equal length (:class:`PaddedGenerator`), so the sharded
policy's ``generate`` batches, collectives there, match across ranks (``stepwise_lit.models.generate``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from stepwise_lit.data.heldout import Problem, held_out_problems
from stepwise_lit.data.records import Prompt
from stepwise_lit.data.sampling import PaddedShardSampler
from stepwise_lit.data.writers import write_rows
from stepwise_lit.errors import SettingError, UserError
from stepwise_lit.evaluation.generation import refuse_fsdp1
from stepwise_lit.grading.answers import AnswerSourceName
from stepwise_lit.models.distributed import shows_progress
from stepwise_lit.models.generate import GenerationSettings, Generator, generator_class, runs_in_lockstep
from stepwise_lit.online.pairs import PairSettings
from stepwise_lit.online.rounds import (
    PAIRS_FILE,
    SOLUTIONS_FILE,
    finish_round,
    round_folder,
    round_state,
    solution_rows,
)
from stepwise_lit.online.solutions import RoundRecord, RoundSettings, default_generation, generate_round
from stepwise_lit.rewards.base import StepScorer

log = logging.getLogger("stepwise_lit")

SUMMARY_FILE = "summary.json"


class OnlineRounds(L.Callback):
    """Online rounds in ``fit`` (see the module docstring). Off unless ``enabled``.

    Needs the trainer's ``reload_dataloaders_every_n_epochs: 1`` (each round is a new
    training set) and a ``StepwiseDataModule``; runs in one process, under DDP and under
    FSDP2 (not FSDP1: ``stepwise_lit.evaluation.generation.refuse_fsdp1``). The number of rounds is
    ``trainer.max_epochs - start_epoch``. Logged per round (epoch): ``online/pairs``,
    ``online/reference_pairs``
    (``pairs.reference_fallback``), ``online/skipped_prompts``,
    ``online/sample_accuracy`` (share of sampled solutions with the right answer),
    ``online/generation_s``, ``online/scoring_s``, ``online/training_s``; with the solve-rate
    evaluation on (``evaluation.during_fit``) the validation after each round logs
    ``val/solve_rate``. Each round's ``summary.json`` (in its folder) holds the same values.

    Args:
        enabled: Run online rounds.
        verifier: Scores every sampled step (``stepwise_lit.rewards.ArithmeticStepVerifier``
            for arithmetic; a GenRM, PRM or ``ImplicitStepScorer`` for real data). Required.
        start_epoch: The first epoch that is a round (0-based). Earlier epochs train on the
            data module's own data, e.g. the SFT warm-up (``model.sft_warmup_steps`` equal
            to that epoch's batches).
        prompts_per_round: Prompts sampled per round, taken in order from the training
            split's distinct prompts (those with a reference solution), wrapping around.
        steps_per_round: Optimizer steps (batches per process) per round.
        generation: Sampling (``do_sample: true``, ``num_samples`` K >= 2, ``temperature``,
            ``top_p``, ``max_new_tokens``); its ``seed`` is mixed with the round and the rank,
            so every round draws anew and a resumed round draws what it drew before.
        pairs: Pair building (``strategy``: ``first_error_branch``, ``best_vs_worst`` or
            ``all_pairs``; see ``stepwise_lit.online.pairs.PairSettings``).
        answer_source: How final answers are read and graded: ``embedded``, ``gsm8k`` or ``math``
            (as ``evaluation.source``: math-verify when installed, else the hand normaliser).
        reference_refresh_rounds: Re-freeze the reference (``model.reference: copy``) from the
            policy at the start of every this-many-th round (round r with r % N == 0, r > 0);
            None keeps it fixed.
        generator: The decoding backend: ``transformers`` (``generate`` with the KV cache),
            ``vllm`` (a vLLM engine fed the policy's weights before every round; its settings
            are ``generation.vllm``; docs/generation.md) or the import path of a class built each
            round as ``Backend(policy, tokenizer, prompt_format, max_prompt_length, progress=bool)``
            whose ``generate(prompts, settings)`` returns K completions per prompt
            (``stepwise_lit.models.generate.Generator``). The same setting as ``evaluation.generator``.
    """

    def __init__(
        self,
        enabled: bool = False,
        verifier: StepScorer | None = None,
        start_epoch: int = 1,
        prompts_per_round: int = 64,
        steps_per_round: int = 10,
        generation: GenerationSettings = default_generation(),
        pairs: PairSettings = PairSettings(),
        answer_source: AnswerSourceName = "embedded",
        reference_refresh_rounds: int | None = None,
        generator: str = "transformers",
    ) -> None:
        for name, value, least in (("start_epoch", start_epoch, 0), ("prompts_per_round", prompts_per_round, 1),
                                   ("steps_per_round", steps_per_round, 1),
                                   ("reference_refresh_rounds", reference_refresh_rounds, 1)):
            if value is not None and value < least:
                raise SettingError(f"online.{name}: must be at least {least}, got {value}")
        if enabled and verifier is None:
            raise SettingError("online.verifier: online rounds need a step scorer, e.g. "
                               "class_path: stepwise_lit.rewards.ArithmeticStepVerifier")
        self.enabled = enabled
        self.verifier = verifier
        self.start_epoch = start_epoch
        self.prompts_per_round = prompts_per_round
        self.steps_per_round = steps_per_round
        self.settings = RoundSettings(generation, pairs, answer_source) if enabled else None
        self.reference_refresh_rounds = reference_refresh_rounds
        self.generator = generator_class(generator, "online.generator") if enabled else None
        self.refreshed_rounds: list[int] = []  # rounds whose reference refresh is done (kept in checkpoints)
        self.data_round: int | None = None  # the round the data module trains on (kept in checkpoints)
        self.pool: list[Problem] = []  # the training split's distinct prompts, read at the start of fit
        self.round_seconds: dict[str, float] = {}  # "training": this round's seconds in training batches so far
        self.round_summary: dict = {}  # the prepared round's figures (logged, and written in its summary.json)
        self.batch_start = 0.0

    # ----------------------------------------------------------------- checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fails at start on settings the loop cannot run with.

        Raises:
            SettingError: Naming the trainer, model or ``online`` setting.
        """
        if not self.enabled or stage != "fit":
            return
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise SettingError("online.enabled: every round is a new training set; set "
                               "trainer.reload_dataloaders_every_n_epochs: 1")
        refuse_fsdp1(trainer, "online.enabled")
        if not hasattr(trainer.datamodule, "train_on_round"):
            raise SettingError("online.enabled: needs the StepwiseDataModule (data.*), which trains on the rounds' files")
        if trainer.max_epochs is None or trainer.max_epochs <= self.start_epoch:
            raise SettingError(f"trainer.max_epochs: the rounds are the epochs from online.start_epoch "
                               f"({self.start_epoch}) on; set max_epochs above it, got {trainer.max_epochs}")
        if pl_module.hparams.reference == "precomputed":
            raise SettingError("model.reference: precomputed computes reference log-probs once for a fixed training "
                               "set; online rounds make a new one each round: use copy, adapter or none")
        if self.reference_refresh_rounds is not None and pl_module.hparams.reference != "copy":
            raise SettingError("online.reference_refresh_rounds: re-freezes a frozen copy; needs model.reference: copy, "
                               f"not {pl_module.hparams.reference!r}")

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reads the prompt pool; when the run starts (``start_epoch: 0``) or resumes in a round,
        prepares it. Lightning restores the loops (the epoch) only after this hook and before
        the first training loader is built, so a resumed run's round is the one the checkpoint's
        callback state names (the round the data module held when it was saved)."""
        if not self.enabled:
            return
        rounds = Path(trainer.default_root_dir) / "online"
        if trainer.ckpt_path is None and rounds.is_dir() and any(rounds.iterdir()):
            raise UserError(f"{rounds} holds the rounds of an earlier run, which a new run would train on: resume "
                            "that run with --ckpt_path, or set another trainer.default_root_dir")
        rows = trainer.datamodule.train_dataset
        self.pool, without_reference = held_out_problems(
            [json.loads(prompt) for prompt in rows["prompt_json"]], rows["reference_solution"], rows["chosen_steps"],
            self.settings.answer_source, None,
        )
        if without_reference:
            log.warning("online: %d training rows without a reference solution are not sampled", without_reference)
        if not self.pool:
            raise SettingError("online.enabled: no training row has a reference solution to grade samples against")
        if self.data_round is not None:
            self.prepare_round(trainer, pl_module, self.data_round)
        elif self.start_epoch == 0:
            self.prepare_round(trainer, pl_module, 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refreshes the reference when the round asks for it; logs the round's generation figures."""
        round_index = trainer.current_epoch - self.start_epoch
        if not self.enabled or round_index < 0:
            return
        if round_index != self.data_round:
            raise UserError(f"online: epoch {trainer.current_epoch} is round {round_index}, but the data module holds "
                            f"round {self.data_round}; resume from a checkpoint saved during a round or at the end "
                            "of the training epoch (not at a validation end)")
        every = self.reference_refresh_rounds
        if every and round_index > 0 and round_index % every == 0 and round_index not in self.refreshed_rounds:
            pl_module.refreeze_reference()
            self.refreshed_rounds.append(round_index)
            log.info("online round %d: the reference is now a frozen copy of the policy", round_index)
        self.round_seconds["training"] = 0.0
        for name in ("pairs", "reference_pairs", "skipped_prompts", "sample_accuracy", "generation_s", "scoring_s"):
            if self.round_summary.get(name) is not None:
                pl_module.log(f"online/{name}", float(self.round_summary[name]), on_epoch=True, on_step=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "training" in self.round_seconds:
            self.round_seconds["training"] += time.perf_counter() - self.batch_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Closes the round just trained (its summary) and prepares the next epoch's round."""
        if not self.enabled:
            return
        round_index = trainer.current_epoch - self.start_epoch
        if round_index >= 0:
            self.close_round(trainer, pl_module, round_index)
        if trainer.current_epoch + 1 < trainer.max_epochs and round_index + 1 >= 0:
            self.prepare_round(trainer, pl_module, round_index + 1)

    def state_dict(self) -> dict:
        return {"refreshed_rounds": list(self.refreshed_rounds), "data_round": self.data_round}

    def load_state_dict(self, state_dict: dict) -> None:
        self.refreshed_rounds = list(state_dict.get("refreshed_rounds", []))
        self.data_round = state_dict.get("data_round")

    # ----------------------------------------------------------------- rounds
    def round_prompts(self, round_index: int) -> tuple[list[Problem], list[str]]:
        """Round ``round_index``'s prompts (the pool in order, wrapping around) and their ids (pool positions)."""
        start = round_index * self.prompts_per_round
        positions = [(start + offset) % len(self.pool) for offset in range(self.prompts_per_round)]
        return [self.pool[position] for position in positions], [str(position) for position in positions]

    def prepare_round(self, trainer: L.Trainer, pl_module: L.LightningModule, round_index: int) -> None:
        """Makes round ``round_index`` exist on disk (generating only what is missing) and hands its pairs to the data side."""
        root = trainer.default_root_dir
        problems, ids = self.round_prompts(round_index)
        prompts, references = [p.prompt for p in problems], [p.solution for p in problems]
        seconds = {"generation": 0.0, "scoring": 0.0}
        if round_state(root, round_index) == "missing":
            seconds = self.generate_shards(trainer, pl_module, round_index, prompts, references, ids)
        record = None
        if trainer.is_global_zero:  # writes the pairs (or checks them) from the solutions on disk
            record = finish_round(root, round_index, ids, self.settings.pairs)
        trainer.strategy.barrier("online round written")
        record = trainer.strategy.broadcast(record, src=0)
        trainer.datamodule.train_on_round(latest_pairs(root, round_index, record), round_index, self.steps_per_round)
        self.data_round = round_index
        solutions = [solution for prompt in record.prompts for solution in prompt.solutions]
        graded = [solution.correct for solution in solutions if solution.correct is not None]
        self.round_summary = {
            "round": round_index,
            "prompts": len(record.prompts),
            "solutions": len(solutions),
            "pairs": len(record.pairs.rows),
            "reference_pairs": record.pairs.reference_pairs,
            "skipped_prompts": sum(record.pairs.skipped.values()),
            "skipped_by_reason": dict(record.pairs.skipped),
            "sample_accuracy": sum(graded) / len(graded) if graded else None,
            "generation_s": seconds["generation"],
            "scoring_s": seconds["scoring"],
        }

    def generate_shards(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        round_index: int,
        prompts: Sequence,
        references: Sequence[str],
        ids: Sequence[str],
    ) -> dict[str, float]:
        """Each rank samples and scores every ``world_size``-th prompt; a sharded policy decodes as
        many prompts on every rank (:class:`PaddedGenerator`). Rank 0 writes all solutions in
        prompt order. Returns the slowest rank's generation and scoring seconds."""
        rank, world = trainer.global_rank, trainer.world_size
        datamodule = trainer.datamodule
        backend = self.generator(
            pl_module.policy, pl_module.tokenizer, datamodule.settings.prompt_format,
            datamodule.hparams.max_prompt_length, progress=shows_progress(trainer),
        )
        positions = list(PaddedShardSampler(range(len(prompts)), num_replicas=world, rank=rank))
        mine = [position for position in positions if position < len(prompts)]
        length = len(positions) if runs_in_lockstep(pl_module.policy) else len(mine)
        generator = PaddedGenerator(backend, length, prompts[positions[-1] % len(prompts)])
        settings = dataclasses.replace(
            self.settings, generation=dataclasses.replace(
                self.settings.generation, seed=round_seed(self.settings.generation.seed, round_index, rank)),
        )
        record = generate_round(generator, self.verifier, [prompts[i] for i in mine], [references[i] for i in mine],
                                settings, [ids[i] for i in mine], progress=shows_progress(trainer))
        shard = (mine, solution_rows(record.prompts), record.seconds)
        shards = all_gather_objects(shard, world)
        if trainer.is_global_zero:
            by_position = {}
            for shard_positions, rows, _ in shards:
                samples = settings.generation.num_samples
                for offset, position in enumerate(shard_positions):
                    by_position[position] = rows[offset * samples : (offset + 1) * samples]
            ordered = [row for position in range(len(prompts)) for row in by_position[position]]
            write_rows(ordered, round_folder(trainer.default_root_dir, round_index) / SOLUTIONS_FILE, overwrite=False)
        return {name: max(seconds[name] for _, _, seconds in shards) for name in ("generation", "scoring")}

    def close_round(self, trainer: L.Trainer, pl_module: L.LightningModule, round_index: int) -> None:
        """Logs the round's training time and writes its ``summary.json`` (rank 0; kept if it exists)."""
        training = self.round_seconds.pop("training", 0.0)
        pl_module.log("online/training_s", training, on_epoch=True, on_step=False)
        solve_rate = trainer.callback_metrics.get("val/solve_rate")  # the validation after this round, if any
        summary = {**self.round_summary, "training_s": training, "steps": self.steps_per_round,
                   "val_solve_rate": None if solve_rate is None else float(solve_rate)}
        log.info("online round %d: %s pairs, generation %.1f s, scoring %.1f s, training %.1f s",
                 round_index, summary.get("pairs"), summary.get("generation_s") or 0.0,
                 summary.get("scoring_s") or 0.0, training)
        path = round_folder(trainer.default_root_dir, round_index) / SUMMARY_FILE
        if trainer.is_global_zero and not path.exists():
            write_rows([summary], path, overwrite=False)


class PaddedGenerator:
    """A ``Generator`` that always decodes ``length`` prompts: those it is given, then ``filler``
    repeated; the filler's completions are dropped. Every rank of a round decodes its share
    through one, all with the same ``length``, so they run the same ``generate`` batches.

    Args:
        generator: The backend.
        length: Prompts per call (at least as many as any call gives).
        filler: The prompt decoded as padding.
    """

    def __init__(self, generator: Generator, length: int, filler: Prompt) -> None:
        self.generator, self.length, self.filler = generator, length, filler

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[list[str]]:
        """See ``stepwise_lit.models.generate.Generator.generate``."""
        padded = [*prompts, *[self.filler] * (self.length - len(prompts))]
        return self.generator.generate(padded, settings)[: len(prompts)]


def latest_pairs(root: str | Path, round_index: int, record: RoundRecord) -> Path:
    """The pairs file a round trains on: its own, or, when no prompt of it gave a pair, that of
    the latest earlier round that has pairs (a warning says so).

    Raises:
        UserError: If no round up to this one has a pair.
    """
    for index in range(round_index, -1, -1):
        path = round_folder(root, index) / PAIRS_FILE
        if path.stat().st_size > 0:
            if index < round_index:
                log.warning("online round %d: no prompt gave a pair (skipped by reason: %s); training on round %d's "
                            "pairs again", round_index, dict(record.pairs.skipped), index)
            return path
    raise UserError(
        f"online round {round_index}: no prompt gave a pair in rounds 0-{round_index} (this round's prompts skipped "
        f"by reason: {dict(record.pairs.skipped)}); sample more solutions (online.generation.num_samples, "
        "temperature) or train the policy longer before the rounds (online.start_epoch, model.sft_warmup_steps)"
    )


def round_seed(seed: int, round_index: int, rank: int) -> int:
    """A sampling seed per (seed, round, rank): the same on a resumed run, apart between rounds and ranks."""
    digest = hashlib.sha256(f"{seed}-{round_index}-{rank}".encode()).hexdigest()
    return int(digest[:8], 16)


def all_gather_objects(value, world_size: int) -> list:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
