"""Measurement helpers shared by the bench scripts.

Every measurement runs in a fresh Python subprocess (a "worker"), so its peak
resident memory (``VmHWM``) belongs to that measurement alone. Workers print
one JSON object as their last stdout line; the driver reports medians and ratios
from that one run. Two ways to alternate, so that load from other users of the
machine falls on every variant alike:

- :func:`alternate`: whole worker runs in the order A B A B ... (short runs);
- :func:`lockstep`: all workers alive at once, released one training step at a
  time, round-robin (A B A B ... at the granularity of a step, a few seconds),
  while the others wait blocked on a pipe; each worker times its own step.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

MIB = 1024 * 1024
TENSOR_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc: every allocation of 64 KiB or more is its own mapping, returned to the OS when freed,
so a process's RSS follows its live tensors instead of what the heap kept (the default
threshold rises to 32 MiB after frees, and freed heap memory stays resident)."""
STEP_PREFIX = "STEP"


def rss_mib() -> float:
    """Current resident set size of this process, MiB (from /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    """Peak resident set size of this process since it started, MiB (``VmHWM``).

    Not ``ru_maxrss``: Linux carries the parent's resident size at fork over into a child's
    ``ru_maxrss`` across exec, so a worker would report at least its driver's size.
    """
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_worker(script: str, args: Sequence[str], timeout: float = 900, env: dict[str, str] | None = None) -> dict:
    """Run ``python script --worker ...`` in a fresh process and parse its last stdout line.

    Args:
        script: Path of the bench script.
        args: Command-line arguments for the worker.
        timeout: Seconds before the worker is killed.
        env: Extra environment variables for the worker.

    Returns:
        The JSON object the worker printed last.

    Raises:
        RuntimeError: The worker failed; the message carries its stderr tail.
    """
    command = [sys.executable, script, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def alternate(
    variants: dict[str, list[str]], script: str, repeats: int, env: dict[str, str] | None = None
) -> dict[str, list[dict]]:
    """Run each variant's worker ``repeats`` times in the order A B A B ...

    Args:
        variants: Variant name -> worker arguments.
        script: Path of the bench script that implements ``--worker``.
        repeats: Rounds; each round runs every variant once, in the given order.
        env: Extra environment variables for the workers.

    Returns:
        Variant name -> the workers' results, in run order.
    """
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(repeats):
        for name, args in variants.items():
            started = time.perf_counter()
            results[name].append(run_worker(script, args, env=env))
            print(f"  round {round_index + 1}/{repeats} {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return results


class StepGate:
    """Worker side of :func:`lockstep`: at a step's end, report its seconds and wait to be released."""

    def __init__(self) -> None:
        self.released = time.perf_counter()

    def step_end(self) -> None:
        """Print ``STEP <seconds since released>`` and block until the driver writes a line."""
        print(f"{STEP_PREFIX} {time.perf_counter() - self.released:.6f}", flush=True)
        if not sys.stdin.readline():
            raise SystemExit("the bench driver has gone")
        self.released = time.perf_counter()


def read_step(name: str, process: subprocess.Popen) -> float:
    """The seconds of the next ``STEP`` line of a worker (other stdout lines are skipped)."""
    for line in process.stdout:
        if line.startswith(STEP_PREFIX):
            return float(line.split()[1])
    raise RuntimeError(f"worker {name} ended before reporting a step (exit {process.wait()}); see its stderr log")


def lockstep(variants: dict[str, list[str]], script: str, steps: int, log_dir: str, between=None):
    """Run the variants' workers side by side, one training step at a time.

    Every worker runs its first (warm-up) step as soon as it has started, then waits; the
    driver releases them one step each, in turn (forward order on even rounds, reverse on
    odd ones), ``steps`` rounds, then lets them all finish.

    Args:
        variants: Variant name -> worker arguments.
        script: Path of the bench script that implements ``--worker`` with a :class:`StepGate`.
        steps: Measured steps per worker.
        log_dir: Folder for the workers' stderr logs.
        between: Called after every round (e.g. to time a matmul under the same load); its
            results are returned.

    Returns:
        ``(step seconds per variant, warm-up seconds per variant, worker results, between results)``.
    """
    os.makedirs(log_dir, exist_ok=True)
    processes = {
        name: subprocess.Popen([sys.executable, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=open(os.path.join(log_dir, f"{name}.log"), "w"), text=True)
        for name, args in variants.items()
    }
    warmup = {name: read_step(name, process) for name, process in processes.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    crosstalk: dict[str, list[float]] = {name: [] for name in variants}  # CPU s the idle workers used
    extra = []
    for round_index in range(steps):
        order = list(processes) if round_index % 2 == 0 else list(reversed(processes))
        for name in order:
            before = {n: cpu_seconds(p.pid) for n, p in processes.items()}
            processes[name].stdin.write("go\n")
            processes[name].stdin.flush()
            times[name].append(read_step(name, processes[name]))
            others = sum(cpu_seconds(p.pid) - before[n] for n, p in processes.items() if n != name)
            crosstalk[name].append(others)
        print(f"  step {round_index + 1}/{steps}: "
              + ", ".join(f"{n} {t[-1]:.2f} s (others' CPU {crosstalk[n][-1]:.2f} s)" for n, t in times.items()),
              file=sys.stderr)
        if between is not None:
            extra.append(between())
    results = {}
    for name, process in processes.items():
        process.stdin.write("go\n")
        process.stdin.close()
    for name, process in processes.items():
        lines = process.stdout.read().strip().splitlines()
        if process.wait() != 0 or not lines:
            raise RuntimeError(f"worker {name} failed ({process.returncode}); see {log_dir}/{name}.log")
        results[name] = json.loads(lines[-1])
    return times, warmup, results, extra


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
