"""The bench: measurement scripts run as files (``python bench/compare_trl.py``, ...), the study run
as a package (``python -m bench.study``), and what they share (`bench.common`). Run from the
repository root; ``--write`` (the scripts) and ``--results`` (the study) write into docs/results/."""
