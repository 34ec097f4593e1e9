"""Data pipeline: input formats, labelled responses, synthetic data, step-aware tokenization, collation, DataModule."""

from stepwise_lit.data.collate import LengthGroupedBatchSampler, StepwiseCollator
from stepwise_lit.data.formats import DataFormatError, to_canonical, validate_row
from stepwise_lit.data.labelled import labelled_responses, read_labelled
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.records import RecordContext, extract_steps
from stepwise_lit.data.synthetic import generate_labelled, generate_pairs
from stepwise_lit.data.tokenize import (
    TokenizeSettings,
    canonical_dataset,
    first_divergence,
    tokenize_dataset,
    tokenize_row,
)


def __getattr__(name: str):
    """Import ``StepwiseDataModule`` on first use, so format and tokenization users do not load Lightning."""
    if name == "StepwiseDataModule":
        from stepwise_lit.data.datamodule import StepwiseDataModule

        return StepwiseDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataFormatError",
    "LengthGroupedBatchSampler",
    "RecordContext",
    "StepwiseCollator",
    "StepwiseDataModule",
    "TokenizeSettings",
    "canonical_dataset",
    "extract_steps",
    "first_divergence",
    "generate_labelled",
    "generate_pairs",
    "labelled_responses",
    "read_labelled",
    "read_records",
    "to_canonical",
    "tokenize_dataset",
    "tokenize_row",
    "validate_row",
]
