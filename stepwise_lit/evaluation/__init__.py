"""Evaluation: preference metrics, solve rate and pass@k, ProcessBench, the generation callback and reports."""
