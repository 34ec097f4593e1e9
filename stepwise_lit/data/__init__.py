"""Data pipeline: input formats, synthetic data, step-aware tokenization, collation, DataModule."""

from stepwise_lit.data.formats import DataFormatError, extract_steps, read_records, to_canonical, validate_row
from stepwise_lit.data.synthetic import generate_pairs

__all__ = [
    "DataFormatError",
    "extract_steps",
    "generate_pairs",
    "read_records",
    "to_canonical",
    "validate_row",
]
