"""What the tests share: entry-point runners, multi-process launchers, stub scorers and generators,
the golden runs. Importable as ``tests.helpers.<module>`` (pytest's ``pythonpath`` puts the
repository root on the path; subprocesses get it in ``PYTHONPATH``)."""
