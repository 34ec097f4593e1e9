"""``StepwiseDataModule``: files, hub datasets or the embedded synthetic set -> batches.

``prepare_data`` (once per node, on local rank 0) reads, converts, validates and
tokenizes the data with ``Dataset.map`` and saves the result under ``cache_dir``
in a folder named by a fingerprint of the source contents, the options, the
tokenizer and this package's data code; a later run with the same fingerprint
reuses it. ``setup`` (every rank) loads that folder. Under DDP, Lightning's
distributed sampler then gives each rank its own rows.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.compute
import torch
from datasets import Dataset, DatasetDict, load_dataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, SequentialSampler

from stepwise_lit.data import formats, synthetic
from stepwise_lit.data import tokenize as tokenize_module
from stepwise_lit.data.collate import LengthGroupedBatchSampler, StepwiseCollator
from stepwise_lit.data.formats import ADAPTERS, DataFormatError, read_records, to_canonical
from stepwise_lit.data.sampling import (
    EpochRandomSampler,
    MarkedRows,
    PaddedShardSampler,
    PairWeightCollator,
    ResumableDataLoader,
)
from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.data.tokenize import TRUNCATION_POLICIES, TokenizeSettings, canonical_dataset, tokenize_dataset
from stepwise_lit.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
DEFAULT_STEP_WISE_PROMPT_TEMPLATE = (
    "{prompt}\n\nSolve this step by step. Start each step on a new paragraph with \"Step k:\"."
)
DATA_CODE = (formats, synthetic, tokenize_module)
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class StepwiseDataModule(L.LightningDataModule):
    """Stepwise preference pairs for training and validation.

    Args:
        path: Training data: a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file,
            a hub dataset id or data folder (read with ``datasets.load_dataset``), or
            None / ``"synthetic"`` for the embedded synthetic arithmetic pairs.
        val_path: Validation data, read like ``path``; None splits ``val_fraction`` of
            the training prompts off (or, for synthetic data, generates
            ``synthetic_val_size`` further pairs).
        val_fraction: Share of the training data's distinct prompts (files and hub
            datasets) held out, with all their pairs, for validation when there is no
            ``val_path``; 0 for no validation.
        format: Input format: ``delimited``, ``stepwise``, ``preference``, ``gsm8k``,
            ``prm800k`` or ``synthetic`` (ignored for the embedded synthetic data).
        split: Split of a hub dataset given as ``path``.
        val_split: Split of a hub dataset given as ``val_path``.
        step_delimiter: Text that starts a new step in text responses.
        max_length: Most tokens per prompt + response; responses keep the longest
            prefix of whole steps that fits. None for no limit.
        max_prompt_length: Most prompt tokens, cut from the left. None for no limit.
        truncation: What to do with a row that keeps no step (or whose kept chosen and
            rejected steps are identical): ``drop`` (counted in the log) or ``error``.
        max_num_steps: Most steps kept per response; None for no limit.
        use_step_wise_prompt: Wrap string prompts in ``step_wise_prompt_template``.
        step_wise_prompt_template: Template containing ``{prompt}``.
        tokenizer_name_or_path: Hub id or folder of the tokenizer; None builds the
            embedded byte-level tokenizer.
        trust_remote_code: Allow the tokenizer's own code from the hub; only for
            sources you trust.
        batch_size: Pairs per training batch (per process).
        eval_batch_size: Pairs per validation batch; None uses ``batch_size``.
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenizing with ``Dataset.map``; None for one.
        seed: Seed for shuffling, the validation split, synthetic data and GSM8K
            corruptions.
        group_by_length: Batch rows of similar length together to cut padding.
        pack_pairs: One row per pair, ``[shared prefix | chosen rest | rejected rest]``
            (``stepwise_lit.data.packing``): the prompt, and whatever the two responses
            begin with alike, is computed once, and nothing pads a chosen row to its
            rejected row. Same log-probs up to float rounding. Needs a model with sdpa or
            eager attention (4D masks; the module names this setting if not).
        synthetic_train_size: Synthetic training pairs.
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
        format: str = "delimited",
        split: str = "train",
        val_split: str = "test",
        step_delimiter: str = "\n\nStep",
        max_length: int | None = 1024,
        max_prompt_length: int | None = 512,
        truncation: str = "drop",
        max_num_steps: int | None = None,
        use_step_wise_prompt: bool = False,
        step_wise_prompt_template: str = DEFAULT_STEP_WISE_PROMPT_TEMPLATE,
        tokenizer_name_or_path: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        group_by_length: bool = False,
        pack_pairs: bool = True,
        synthetic_train_size: int = 2000,
        synthetic_val_size: int = 200,
        synthetic_max_value: int = 99,
        require_scores: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if path not in (None, SYNTHETIC) and format not in ADAPTERS:
            raise DataFormatError(f"unknown format {format!r}; expected one of {', '.join(sorted(ADAPTERS))}")
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
        if use_step_wise_prompt and "{prompt}" not in step_wise_prompt_template:
            raise ValueError("step_wise_prompt_template must contain '{prompt}'")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.path = None if path == SYNTHETIC else path
        self.val_path = val_path
        self.val_fraction = val_fraction
        self.format = format
        self.split = split
        self.val_split = val_split
        self.step_delimiter = step_delimiter
        self.truncation = truncation
        self.settings = TokenizeSettings(
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_num_steps=max_num_steps,
            step_wise_prompt_template=step_wise_prompt_template if use_step_wise_prompt else None,
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.seed = seed
        self.group_by_length = group_by_length
        self.pack_pairs = pack_pairs
        self.synthetic_train_size = synthetic_train_size
        self.synthetic_val_size = synthetic_val_size
        self.synthetic_max_value = synthetic_max_value
        self.require_scores = require_scores
        self.cache_root = Path(cache_dir or os.environ.get("STEPWISE_LIT_CACHE", "~/.cache/stepwise_lit")).expanduser()
        self.tokenizer = load_tokenizer(tokenizer_name_or_path, trust_remote_code=trust_remote_code)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    # ------------------------------------------------------------ preparation

    @property
    def cache_path(self) -> Path:
        """Folder of the tokenized splits for the current sources and options."""
        return self.cache_root / "data" / self.fingerprint

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything the tokenized data depends on (sources are hashed once per instance)."""
        return Hasher.hash(
            {
                "train": source_fingerprint(self.path, self.split),
                "val": None if self.val_path is None else source_fingerprint(self.val_path, self.val_split),
                "synthetic": (self.synthetic_train_size, self.synthetic_val_size, self.synthetic_max_value)
                if self.path is None
                else None,
                "options": (
                    self.format,
                    self.step_delimiter,
                    self.val_fraction,
                    self.require_scores,
                    self.truncation,
                    self.seed,
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
        if val_rows is not None:
            if not val_rows:
                return {"train": train}
            val_source = self.source_name(self.val_path) if self.val_path else SYNTHETIC
            return {"train": train, "val": self.tokenize(val_rows, val_source, f"{self.fingerprint}-val")}
        if self.val_fraction == 0:
            return {"train": train}
        return self.split_by_prompt(train)

    def split_by_prompt(self, rows: Dataset) -> dict[str, Dataset]:
        """Hold out ``val_fraction`` of the distinct prompts (seeded), with every pair of each:
        pairs of one problem (several PRM800K steps, several model solutions) never land on
        both sides."""
        prompts = sorted(set(rows["prompt_json"]))
        random.Random(self.seed).shuffle(prompts)
        num_val = math.ceil(self.val_fraction * len(prompts))
        if num_val >= len(prompts):
            raise DataFormatError(
                f"val_fraction {self.val_fraction}: the {len(rows)} pairs have {len(prompts)} distinct prompt(s), "
                "too few to hold some out; set val_path, or val_fraction: 0",
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
        val = None if self.val_path is None else self.canonical_rows(self.val_path, self.val_split)
        if self.path is None:
            rows = generate_pairs(
                self.synthetic_train_size + self.synthetic_val_size, seed=self.seed, max_value=self.synthetic_max_value
            )
            rows = to_canonical(rows, SYNTHETIC, SYNTHETIC)
            return rows[: self.synthetic_train_size], rows[self.synthetic_train_size :] if val is None else val
        return self.canonical_rows(self.path, self.split), val

    def canonical_rows(self, path: str, split: str) -> list[dict]:
        """Read a local file (our readers) or a hub dataset / data folder (``datasets``) and convert it."""
        if Path(path).suffix.lower() in DATA_FILE_SUFFIXES and not Path(path).is_file():
            raise DataFormatError(f"data file not found (looked at {Path(path).resolve()})", source=Path(path).name)
        records = read_records(path) if Path(path).is_file() else load_dataset(path, split=split).to_list()
        return to_canonical(
            records,
            self.format,
            self.source_name(path),
            self.step_delimiter,
            require_scores=self.require_scores,
            seed=self.seed,
        )

    def tokenize(self, rows: list[dict], source: str, fingerprint: str) -> Dataset:
        """Tokenize canonical rows with ``Dataset.map``."""
        return tokenize_dataset(
            canonical_dataset(rows),
            self.tokenizer,
            self.settings,
            source,
            truncation=self.truncation,
            num_proc=self.num_proc,
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

    def collator(self) -> StepwiseCollator:
        """The batch collator, padding with the tokenizer's pad id."""
        return StepwiseCollator(self.tokenizer.pad_token_id, self.pack_pairs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, optionally grouped by length.

        Each epoch's order is fixed by ``seed`` and the epoch, and the loader records how far
        an epoch got, so ``--ckpt_path last`` resumes with the batches an uninterrupted run
        would see (see ``stepwise_lit.distributed``). Under DDP, Lightning's distributed sampler
        (seeded by ``seed_everything``) gives each rank its rows.
        """
        sampler = EpochRandomSampler(self.train_dataset, seed=self.seed)
        loader_options = {
            "collate_fn": self.collator(),
            "num_workers": self.num_workers,
            "generator": self.loader_generator(),
        }
        if self.group_by_length:
            batch_sampler = LengthGroupedBatchSampler(
                sampler, self.batch_size, drop_last=False, lengths=pair_lengths(self.train_dataset)
            )
            return ResumableDataLoader(self.train_dataset, batch_sampler=batch_sampler, **loader_options)
        return ResumableDataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, **loader_options)

    def loader_generator(self) -> torch.Generator:
        """Seeds the loaders' worker processes, so iterating never draws from the global RNG."""
        return torch.Generator().manual_seed(self.seed)

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
            num_workers=self.num_workers,
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
            num_workers=self.num_workers,
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


def source_fingerprint(path: str | None, split: str) -> str | None:
    """The contents hash of a local file; the id and split of a hub dataset; None for synthetic data."""
    if path is None:
        return None
    if Path(path).is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return f"{path}:{split}"


def pair_lengths(dataset: Dataset) -> list[int]:
    """Per pair, the longer side's token count (what padding a batch grows to)."""
    table = dataset.with_format("arrow")[:]
    chosen = pyarrow.compute.list_value_length(table["chosen_input_ids"]).to_numpy()
    rejected = pyarrow.compute.list_value_length(table["rejected_input_ids"]).to_numpy()
    return np.maximum(chosen, rejected).tolist()
