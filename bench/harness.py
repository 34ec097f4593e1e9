"""Measurement helpers shared by the bench scripts.

Every measurement runs in a fresh Python subprocess (a "worker"), so its peak
resident memory (``ru_maxrss``) belongs to that measurement alone. Workers print
one JSON object as their last stdout line; the driver runs the variants in
alternating order (A B A B ...) so that load from other users of the machine
falls on every variant alike, and reports medians and ratios from that one run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

MIB = 1024 * 1024


def rss_mib() -> float:
    """Current resident set size of this process, MiB (from /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, args: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python script --worker ...`` in a fresh process and parse its last stdout line.

    Args:
        script: Path of the bench script.
        args: Command-line arguments for the worker.
        timeout: Seconds before the worker is killed.

    Returns:
        The JSON object the worker printed last.

    Raises:
        RuntimeError: The worker failed; the message carries its stderr tail.
    """
    command = [sys.executable, script, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def alternate(variants: dict[str, list[str]], script: str, repeats: int) -> dict[str, list[dict]]:
    """Run each variant's worker ``repeats`` times in the order A B A B ...

    Args:
        variants: Variant name -> worker arguments.
        script: Path of the bench script that implements ``--worker``.
        repeats: Rounds; each round runs every variant once, in the given order.

    Returns:
        Variant name -> the workers' results, in run order.
    """
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(repeats):
        for name, args in variants.items():
            started = time.perf_counter()
            results[name].append(run_worker(script, args))
            print(f"  round {round_index + 1}/{repeats} {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return results


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's measured fp32 matmul ceiling: best GFLOP/s of a ``size``² matrix product.

    Args:
        size: Side of the square fp32 matrices.
        repeats: Timed products after two warm-up ones; the fastest counts.

    Returns:
        GFLOP/s (2·size³ FLOPs per product).
    """
    left, right = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        left @ right
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (pasted as is into BENCHMARKS.md)."""
    print("| " + " | ".join(headers) + " |")
    print("| " + " | ".join("---" for _ in headers) + " |")
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
