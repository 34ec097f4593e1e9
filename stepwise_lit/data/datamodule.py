"""``StepwiseDataModule``: files, hub datasets or the embedded synthetic set -> batches.

``prepare_data`` (once per node, on local rank 0) reads, converts, validates and
tokenizes the data with ``Dataset.map`` and saves the result under ``cache_dir``
in a folder named by a fingerprint of the source contents, the options, the
tokenizer and this package's data code; a later run with the same fingerprint
reuses it. ``setup`` (every rank) loads that folder. Under DDP, Lightning's
distributed sampler then gives each rank its own rows.

Settings live in ``self.hparams`` (``save_hyperparameters``) and are checked at
construction: a bad one raises :class:`~stepwise_lit.errors.SettingError` whose message
starts with its name as YAML writes it (``data.batch_size: ...``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, get_args

import lightning as L
import numpy as np
import pyarrow.compute
import torch
from datasets import Dataset, DatasetDict
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, SequentialSampler

from stepwise_lit.data import chat, formats, gsm8k, prm800k, records, stepdpo, synthetic
from stepwise_lit.data import tokenize as tokenize_module
from stepwise_lit.data.chat import check_prompt_format, prompt_format_of
from stepwise_lit.data.collate import LengthGroupedBatchSampler, StepwiseCollator
from stepwise_lit.data.formats import Format, to_canonical
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.sampling import (
    EpochRandomSampler,
    MarkedRows,
    PaddedShardSampler,
    PairWeightCollator,
    ResumableDataLoader,
    RoundSampler,
)
from stepwise_lit.data.sources import (
    SYNTHETIC,
    DataFiles,
    DataSource,
    check_data_source,
    check_hub_options,
    data_sources,
    read_source,
    source_fingerprint,
)
from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.data.tokenize import TokenizeSettings, Truncation, canonical_dataset, tokenize_dataset
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import DataFormatError, SettingError
from stepwise_lit.grading import arithmetic

logger = logging.getLogger(__name__)

DEFAULT_STEP_WISE_PROMPT_TEMPLATE = (
    "{prompt}\n\nSolve this step by step. Start each step on a new paragraph with \"Step k:\"."
)
DEFAULT_MAX_PROMPT_LENGTH = 512
# Settings that are at least 1 where set (some may be null).
POSITIVE_SETTINGS = (
    "batch_size", "eval_batch_size", "max_length", "max_prompt_length", "max_num_steps", "num_proc", "synthetic_train_size",
    "pack_budget",
)
DATA_CODE = (arithmetic, chat, formats, gsm8k, prm800k, records, stepdpo, synthetic, tokenize_module)


class StepwiseDataModule(L.LightningDataModule):
    """Stepwise preference pairs for training and validation.

    Args:
        path: Training data: a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file or data
            folder, a hub dataset id ``owner/name`` (read with ``datasets.load_dataset``), or
            None / ``"synthetic"`` for the embedded synthetic arithmetic pairs. A path that
            does not exist and is not an ``owner/name`` id fails at once.
        val_path: Validation data, read like ``path``; None splits ``val_fraction`` of
            the training prompts off (or, for synthetic data, generates
            ``synthetic_val_size`` further pairs).
        val_fraction: Share of the training data's distinct prompts (files and hub
            datasets) held out, with all their pairs, for validation when there is no
            ``val_path``; in [0, 1), 0 for no validation.
        format: Input format (ignored for the embedded synthetic data): ``delimited``
            (``prompt``, ``chosen``, ``rejected`` texts split on ``step_delimiter``),
            ``stepwise`` (canonical rows), ``preference`` (TRL rows), ``gsm8k``,
            ``prm800k``, ``step_dpo`` (Step-DPO rows: ``prompt``, ``initial_reason_steps``,
            ``chosen``, ``rejected``; set ``step_delimiter`` to ``"\\nStep"``) or ``synthetic``.
        split: Split of a hub dataset given as ``path``.
        val_split: Split of a hub dataset given as ``val_path``.
        name: Configuration of the data folder or hub dataset ``path`` (``datasets.load_dataset``'s
            ``name``, e.g. ``main`` for ``openai/gsm8k``); None: its default one. Part of the
            tokenized-data cache key, as are ``revision`` and ``data_files``.
        revision: Branch, tag or commit of the hub dataset ``path``; None: the default branch
            (pin a commit to train on fixed data).
        data_files: Files of the data folder or hub dataset ``path`` to read instead of its
            configured ones: a file or glob, a list, or a mapping split -> files (relative to
            the folder or repository).
        val_name: ``name`` for ``val_path``.
        val_revision: ``revision`` for ``val_path``.
        val_data_files: ``data_files`` for ``val_path``.
        step_delimiter: Non-empty text that starts a new step in text responses.
        max_length: Most tokens per prompt + response (at least 1); responses keep the
            longest prefix of whole steps that fits. None for no limit.
        max_prompt_length: Most prompt tokens, cut from the left; at least 1, and a value
            you set must be below ``max_length`` so a response has room (with the default
            512 and a smaller ``max_length``, a prompt that leaves no room drops its row,
            counted in the log). None for no limit.
        truncation: A row that does not fit whole (``max_length``, ``max_prompt_length``,
            ``max_num_steps``): ``truncate`` keeps it cut at step boundaries, ``drop``
            drops it, ``error`` stops naming it. Cut and dropped rows are counted in the
            log; a row that keeps no step, or whose kept sides are identical, is dropped
            under ``truncate``.
        max_num_steps: Most steps kept per response (at least 1); None for no limit.
        use_step_wise_prompt: Wrap string prompts in ``step_wise_prompt_template``.
        step_wise_prompt_template: Template containing ``{prompt}``.
        apply_chat_template: Render string prompts as the user turn of the tokenizer's chat
            template, with the generation prompt (chat-message prompts always are), in
            training, generation and implicit scoring alike (``stepwise_lit.data.chat``).
            None: on when the tokenizer has a chat template of its own (an instruct model's),
            off for the embedded byte tokenizer, whose minimal template the embedded model is
            not trained with. True with a tokenizer without a template stops at start.
        system_prompt: System turn put before each prompt when the chat template is applied
            (and before chat messages that have none); None for none. Refused when string
            prompts are not rendered through a chat template.
        tokenizer_name_or_path: Hub id or folder of the tokenizer; None builds the
            embedded byte-level tokenizer.
        trust_remote_code: Allow the tokenizer's own code from the hub; only for
            sources you trust.
        batch_size: Pairs per training batch (per process), at least 1.
        eval_batch_size: Pairs per validation batch, at least 1; None uses ``batch_size``.
        num_workers: DataLoader worker processes (0: load in the main process).
        num_proc: Processes for tokenizing with ``Dataset.map`` (at least 1); None for one.
        seed: Seed for shuffling, the validation split, synthetic data and GSM8K
            corruptions.
        group_by_length: Batch rows of similar length together to cut padding.
        pack_pairs: One row per pair, ``[shared prefix | chosen rest | rejected rest]``
            (``stepwise_lit.data.packing``): the prompt, and whatever the two responses
            begin with alike, is computed once, and nothing pads a chosen row to its
            rejected row. Same log-probs up to float rounding. Needs a model with sdpa or
            eager attention (4D masks) or flex_attention (a block mask); the module names
            this setting if not.
        pack_budget: With ``pack_pairs``: most tokens per packed row, filled with several
            pairs' blocks (the fewest rows for the batch's pairs, balanced in length, see
            ``stepwise_lit.data.packing.balanced_rows``; attention block-diagonal over the
            pairs, positions restarted per pair), so that rows are not padded to the
            batch's longest pair; a pair longer than the budget gets a row of its own.
            None: one pair per row. Same log-probs up to float rounding.
        synthetic_train_size: Synthetic training pairs (at least 1).
        synthetic_val_size: Synthetic validation pairs (problems distinct from the
            training ones); 0 for no validation.
        synthetic_max_value: Largest number in a synthetic problem (at least 10); smaller
            numbers make the arithmetic easier for a tiny model to learn.
        require_scores: Every step must have a score in the data. Set False only
            when a step scorer fills missing scores at train time; otherwise
            rows without scores fail at preparation (score them first with
            ``python -m stepwise_lit.score``).
        cache_dir: Where tokenized data is kept; None uses ``$STEPWISE_LIT_CACHE``
            or ``~/.cache/stepwise_lit``.
    """

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        format: Format = "delimited",
        split: str = "train",
        val_split: str = "test",
        name: str | None = None,
        revision: str | None = None,
        data_files: DataFiles | None = None,
        val_name: str | None = None,
        val_revision: str | None = None,
        val_data_files: DataFiles | None = None,
        step_delimiter: str = "\n\nStep",
        max_length: int | None = 1024,
        max_prompt_length: int | None = DEFAULT_MAX_PROMPT_LENGTH,
        truncation: Truncation = "truncate",
        max_num_steps: int | None = None,
        use_step_wise_prompt: bool = False,
        step_wise_prompt_template: str = DEFAULT_STEP_WISE_PROMPT_TEMPLATE,
        apply_chat_template: bool | None = None,
        system_prompt: str | None = None,
        tokenizer_name_or_path: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        group_by_length: bool = False,
        pack_pairs: bool = True,
        pack_budget: int | None = None,
        synthetic_train_size: int = 2000,
        synthetic_val_size: int = 200,
        synthetic_max_value: int = 99,
        require_scores: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_data_settings(self.hparams)
        self.settings = TokenizeSettings(
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_num_steps=max_num_steps,
            prompt_format=prompt_format_of(self.hparams),
        )
        self.cache_root = Path(cache_dir or os.environ.get("STEPWISE_LIT_CACHE", "~/.cache/stepwise_lit")).expanduser()
        self.tokenizer = load_tokenizer(tokenizer_name_or_path, trust_remote_code=trust_remote_code, setting="data.tokenizer_name_or_path")
        check_prompt_format(self.tokenizer, self.settings.prompt_format)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.online_round: tuple[int, int] | None = None  # (round, batches per process) once train_on_round ran

    @property
    def path(self) -> str | None:
        """The training source; None for the embedded synthetic data."""
        return None if self.hparams.path == SYNTHETIC else self.hparams.path

    @property
    def sources(self) -> tuple[DataSource | None, DataSource | None]:
        """The training and validation sources (`stepwise_lit.data.sources.data_sources`)."""
        return data_sources(self.hparams)

    @property
    def eval_batch_size(self) -> int:
        """Pairs per validation, test and predict batch."""
        return self.hparams.eval_batch_size or self.hparams.batch_size

    # ------------------------------------------------------------ preparation

    @property
    def cache_path(self) -> Path:
        """Folder of the tokenized splits for the current sources and options."""
        return self.cache_root / "data" / self.fingerprint

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything the tokenized data depends on (sources are hashed once per instance)."""
        hparams = self.hparams
        return Hasher.hash(
            {
                "train": source_fingerprint(self.sources[0]),
                "val": source_fingerprint(self.sources[1]),
                "synthetic": (hparams.synthetic_train_size, hparams.synthetic_val_size, hparams.synthetic_max_value)
                if self.path is None
                else None,
                "options": (
                    hparams.format,
                    hparams.step_delimiter,
                    hparams.val_fraction,
                    hparams.require_scores,
                    hparams.truncation,
                    hparams.seed,
                    "val split by prompt",
                ),
                "settings": self.settings,
                "tokenizer": Hasher.hash(self.tokenizer),
                "code": [hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest() for module in DATA_CODE],
            }
        )

    def prepare_data(self) -> None:
        """Read, validate and tokenize the data once, and save it under the cache folder."""
        target = self.cache_path
        if target.exists():
            logger.info("using tokenized data cached at %s", target)
            return
        splits = self.tokenized_splits()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        DatasetDict(splits).save_to_disk(str(staging))
        try:
            staging.rename(target)
        except OSError:  # another process finished the same data first
            shutil.rmtree(staging)
        logger.info(
            "tokenized data saved at %s (%s)", target, ", ".join(f"{name}: {len(data)} pairs" for name, data in splits.items())
        )

    def tokenized_splits(self) -> dict[str, Dataset]:
        """Tokenized ``train`` and, if there is validation data, ``val`` splits."""
        train_rows, val_rows = self.canonical_splits()
        train = self.tokenize(train_rows, self.source_name(self.path), f"{self.fingerprint}-train")
        if len(train) == 0:
            raise DataFormatError(
                f"none of the {len(train_rows)} pairs fits data.max_length {self.hparams.max_length} "
                f"(truncation: {self.hparams.truncation}; the log counts the dropped rows by reason)",
                source=self.source_name(self.path),
            )
        if val_rows is not None:
            if not val_rows:
                return {"train": train}
            val_source = self.source_name(self.hparams.val_path) if self.hparams.val_path else SYNTHETIC
            return {"train": train, "val": self.tokenize(val_rows, val_source, f"{self.fingerprint}-val")}
        if self.hparams.val_fraction == 0:
            return {"train": train}
        return self.split_by_prompt(train)

    def split_by_prompt(self, rows: Dataset) -> dict[str, Dataset]:
        """Hold out ``val_fraction`` of the distinct prompts (seeded), with every pair of each:
        pairs of one problem (several PRM800K steps, several model solutions) never land on
        both sides."""
        prompts = sorted(set(rows["prompt_json"]))
        random.Random(self.hparams.seed).shuffle(prompts)
        num_val = math.ceil(self.hparams.val_fraction * len(prompts))
        if num_val >= len(prompts):
            raise DataFormatError(
                f"val_fraction {self.hparams.val_fraction}: the {len(rows)} pairs have {len(prompts)} distinct "
                "prompt(s), too few to hold some out; set val_path, or val_fraction: 0",
                source=self.source_name(self.path),
            )
        val_prompts = set(prompts[:num_val])
        is_val = [prompt in val_prompts for prompt in rows["prompt_json"]]
        splits = {
            "train": rows.select([i for i, held_out in enumerate(is_val) if not held_out]),
            "val": rows.select([i for i, held_out in enumerate(is_val) if held_out]),
        }
        logger.info(
            "validation: %d of %d prompts held out (%d of %d pairs)", num_val, len(prompts), len(splits["val"]), len(rows)
        )
        return splits

    def canonical_splits(self) -> tuple[list[dict], list[dict] | None]:
        """Validated canonical rows for training and validation.

        Validation rows are None when they are to be split off the training rows
        by ``val_fraction``, and empty when there is no validation (synthetic data
        with ``synthetic_val_size`` 0).
        """
        hparams = self.hparams
        train_source, val_source = self.sources
        val = None if val_source is None else self.canonical_rows(val_source)
        if train_source is None:
            num_pairs = hparams.synthetic_train_size + hparams.synthetic_val_size
            rows = generate_pairs(num_pairs, seed=hparams.seed, max_value=hparams.synthetic_max_value)
            rows = to_canonical(rows, SYNTHETIC, SYNTHETIC)
            return rows[: hparams.synthetic_train_size], rows[hparams.synthetic_train_size :] if val is None else val
        return self.canonical_rows(train_source), val

    def canonical_rows(self, data_source: DataSource) -> list[dict]:
        """Read a local file (our readers) or a hub dataset / data folder (``datasets``) and convert it.

        Raises:
            DataFormatError: For a file that cannot be read, an invalid record, or a source
                whose every record is skipped (reasons in the log).
        """
        records = read_source(data_source)
        source = self.source_name(data_source.path)
        rows = to_canonical(
            records,
            self.hparams.format,
            source,
            self.hparams.step_delimiter,
            require_scores=self.hparams.require_scores,
            seed=self.hparams.seed,
        )
        if not rows:
            raise DataFormatError(
                f"none of the {len(records)} records gives a pair (format {self.hparams.format}; "
                "the log counts the skipped records by reason)",
                source=source,
            )
        return rows

    def tokenize(self, rows: list[dict], source: str, fingerprint: str) -> Dataset:
        """Tokenize canonical rows with ``Dataset.map``."""
        return tokenize_dataset(
            canonical_dataset(rows),
            self.tokenizer,
            self.settings,
            source,
            truncation=self.hparams.truncation,
            num_proc=self.hparams.num_proc,
            new_fingerprint=fingerprint,
        )

    @staticmethod
    def source_name(path: str | None) -> str:
        """Name of a source in messages: the file name, the hub id, or ``synthetic``."""
        return SYNTHETIC if path is None else Path(path).name if Path(path).is_file() else path

    # ------------------------------------------------------------ loading

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenized splits (preparing them first if this process has not)."""
        if not self.cache_path.exists():
            self.prepare_data()
        splits = DatasetDict.load_from_disk(str(self.cache_path))
        self.train_dataset = with_row_index(splits["train"])
        self.val_dataset = with_row_index(splits["val"]) if "val" in splits else None

    def train_on_round(self, path: str | Path, round_index: int, num_batches: int) -> None:
        """Train from the next training epoch on the pairs an online round wrote to ``path``
        (canonical rows, ``--data.format stepwise``; see ``stepwise_lit.online``), read,
        validated and tokenized like any training file (rows cut or dropped by ``max_length``
        are counted in the log). Every training epoch then has ``num_batches`` batches per
        process (`RoundSampler`: the pairs reshuffled and repeated as often as needed, in an
        order fixed by ``seed`` and the round; ``group_by_length`` does not apply). Needs the
        trainer's ``reload_dataloaders_every_n_epochs: 1``, so the next epoch asks for a new loader.

        Raises:
            DataFormatError: If the file holds no pair, or none fits ``max_length``.
        """
        source = str(path)
        records = read_records(source)
        if not records:
            raise DataFormatError("an online round's pairs file with no pair", source=source)
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        rows = to_canonical(records, "stepwise", source)
        tokenized = self.tokenize(rows, Path(path).name, f"{self.fingerprint}-round-{round_index}-{digest}")
        if len(tokenized) == 0:
            raise DataFormatError(f"none of the {len(rows)} pairs fits data.max_length {self.hparams.max_length} "
                                  "(the log counts the dropped rows by reason)", source=source)
        self.train_dataset = with_row_index(tokenized)
        self.online_round = (round_index, num_batches)

    def collator(self) -> StepwiseCollator:
        """The batch collator, padding with the tokenizer's pad id."""
        return StepwiseCollator(self.tokenizer.pad_token_id, self.hparams.pack_pairs, self.hparams.pack_budget)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, optionally grouped by length.

        Each epoch's order is fixed by ``seed`` and the epoch, and the loader records how far
        an epoch got, so ``--ckpt_path last`` resumes with the batches an uninterrupted run
        would see (see ``stepwise_lit.models.distributed``). Under DDP, Lightning's distributed sampler
        (seeded by ``seed_everything``) gives each rank its rows. After `train_on_round`, the
        round's pairs in a `RoundSampler` order.
        """
        loader_options = {
            "collate_fn": self.collator(),
            "num_workers": self.hparams.num_workers,
            "generator": self.loader_generator(),
        }
        if self.online_round is not None:
            round_index, num_batches = self.online_round
            processes = self.data_parallel_share()["num_replicas"]
            sampler = RoundSampler(len(self.train_dataset), num_batches * self.hparams.batch_size * processes,
                                   seed=self.hparams.seed + round_index)
            return ResumableDataLoader(self.train_dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                                       **loader_options)
        sampler = EpochRandomSampler(self.train_dataset, seed=self.hparams.seed)
        if self.hparams.group_by_length:
            batch_sampler = LengthGroupedBatchSampler(
                sampler, self.hparams.batch_size, drop_last=False, lengths=pair_lengths(self.train_dataset)
            )
            return ResumableDataLoader(self.train_dataset, batch_sampler=batch_sampler, **loader_options)
        return ResumableDataLoader(self.train_dataset, batch_size=self.hparams.batch_size, sampler=sampler, **loader_options)

    def loader_generator(self) -> torch.Generator:
        """Seeds the loaders' worker processes, so iterating never draws from the global RNG."""
        return torch.Generator().manual_seed(self.hparams.seed)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order; an empty list when there is no validation data."""
        return self.eval_dataloader()

    def test_dataloader(self) -> DataLoader | list:
        """`test` runs on the validation split (set ``val_path`` to test on another file)."""
        return self.eval_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        """`predict` gives implicit rewards for the validation split, in order (under DDP,
        Lightning splits it across ranks without repeating rows)."""
        if self.val_dataset is None:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.eval_batch_size,
            sampler=SequentialSampler(self.val_dataset),
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
        )

    def eval_dataloader(self) -> DataLoader | list:
        """The validation split in order (this rank's share when distributed); an empty list
        when there is none.

        Every rank gets as many batches as the others (forward passes under DDP and FSDP are
        collective), so a share may end with repeated rows; batches carry ``pair_weights``
        (float ``[B]``), 0 for those repeats, and the metrics ignore them.
        """
        if self.val_dataset is None:
            return []
        return DataLoader(
            MarkedRows(self.val_dataset),
            batch_size=self.eval_batch_size,
            sampler=PaddedShardSampler(self.val_dataset, **self.data_parallel_share()),
            collate_fn=PairWeightCollator(self.collator()),
            num_workers=self.hparams.num_workers,
            generator=self.loader_generator(),
        )

    def data_parallel_share(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` of this process's data-parallel share (1 and 0 when not distributed)."""
        share = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return share or {"num_replicas": 1, "rank": 0}


def with_row_index(dataset: Dataset) -> Dataset:
    """The split with a ``row_index`` column (each row's position), which batches carry so that
    per-row data kept outside the dataset (precomputed reference log-probs) can be looked up."""
    return dataset.add_column("row_index", list(range(len(dataset))))


def pair_lengths(dataset: Dataset) -> list[int]:
    """Per pair, the longer side's token count (what padding a batch grows to)."""
    table = dataset.with_format("arrow")[:]
    chosen = pyarrow.compute.list_value_length(table["chosen_input_ids"]).to_numpy()
    rejected = pyarrow.compute.list_value_length(table["rejected_input_ids"]).to_numpy()
    return np.maximum(chosen, rejected).tolist()


def check_data_settings(hparams: Mapping[str, Any]) -> None:
    """Raise :class:`SettingError` for the first unusable data setting, named as in YAML (``data.batch_size: ...``)."""
    for name in ("format", "truncation"):
        choices = get_args(Format if name == "format" else Truncation)
        if hparams[name] not in choices:
            raise SettingError(f"data.{name}: unknown value {hparams[name]!r}; expected one of {', '.join(choices)}")
    for name in POSITIVE_SETTINGS:
        value = hparams[name]
        if value is not None and value < 1:
            raise SettingError(f"data.{name}: must be at least 1 (or null where allowed), got {value}")
    if hparams["num_workers"] < 0 or hparams["synthetic_val_size"] < 0:
        name = "num_workers" if hparams["num_workers"] < 0 else "synthetic_val_size"
        raise SettingError(f"data.{name}: must be 0 or more, got {hparams[name]}")
    if hparams["synthetic_max_value"] < 10:
        raise SettingError(f"data.synthetic_max_value: must be at least 10, got {hparams['synthetic_max_value']}")
    max_length, max_prompt_length = hparams["max_length"], hparams["max_prompt_length"]
    if (
        max_length is not None
        and max_prompt_length not in (None, DEFAULT_MAX_PROMPT_LENGTH)
        and max_prompt_length >= max_length
    ):
        raise SettingError(
            f"data.max_prompt_length: {max_prompt_length} leaves no room for a response within "
            f"data.max_length {max_length}; set it below max_length"
        )
    if hparams["pack_budget"] is not None and not hparams["pack_pairs"]:
        raise SettingError("data.pack_budget: packs several pairs per row, which needs data.pack_pairs: true")
    if not 0.0 <= hparams["val_fraction"] < 1.0:
        raise SettingError(f"data.val_fraction: must be in [0, 1) (0 for no validation), got {hparams['val_fraction']}")
    if not hparams["step_delimiter"]:
        raise SettingError("data.step_delimiter: must not be empty (it is the text that starts each step)")
    if hparams["use_step_wise_prompt"] and "{prompt}" not in hparams["step_wise_prompt_template"]:
        raise SettingError("data.step_wise_prompt_template: must contain '{prompt}'")
    if hparams["path"] in (None, SYNTHETIC) and hparams["format"] not in ("delimited", SYNTHETIC):
        raise SettingError(
            f"data.path: format {hparams['format']!r} reads a data file, and no path is set "
            "(null or 'synthetic' means the embedded pairs)"
        )
    for name in ("path", "val_path"):
        check_data_source(name, hparams[name])
    for source in data_sources(hparams):
        if source is not None:
            check_hub_options(source)


