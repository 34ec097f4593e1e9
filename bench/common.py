"""What the bench scripts share: the bench's data, model and paths; the measurement harness; the
results files. Every script imports this module and no other script.

Data and model: `load_pairs` (GSM8K pairs that fit a length, synthetic ones where the data is
absent), `token_rows`, `build_model` (the ~19M-parameter `BENCH_MODEL`, seed 0, its vocabulary
padded by `pad_vocabulary`).

Measurements: every measurement runs in a fresh Python subprocess (a "worker"), so its peak
resident memory (``VmHWM``) belongs to that measurement alone. Workers print one JSON object as
their last stdout line; the driver reports medians and ratios from that one run. Two ways to
alternate, so that load from other users of the machine falls on every variant alike:

- :func:`alternate`: whole worker runs in the order A B A B ... (short runs);
- :func:`lockstep`: all workers alive at once, released one training step at a time,
  round-robin (A B A B ... at the granularity of a step, a few seconds), while the others wait
  blocked on a pipe; each worker times its own step.

Results: a script's :class:`Report` prints its lines and tables and, with ``--write``
(:func:`add_write_option`), writes them under the command line and seed to a markdown file in
``docs/results/`` with the JSON summary beside it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
GSM8K_PATH = REPO.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
BENCH_MODEL = {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "intermediate_size": 1376,
               "max_position_embeddings": 1024}
"""About 19.2M parameters with the byte-level vocabulary (259 tokens)."""
LEARNING_RATE = 1e-5


# ----------------------------------------------------------------------------- data and model
def load_pairs(path: Path, count: int, max_length: int, seed: int = 0) -> list[dict]:
    """The first ``count`` canonical pairs whose chosen and rejected both fit ``max_length`` tokens.

    GSM8K model-solution pairs carry no rejected step scores (the adapter leaves them to
    a verifier); the bench fills -1 for every rejected step (the final answer is wrong),
    so no reward model runs during the timed steps.

    Args:
        path: GSM8K ``example_model_solutions.jsonl``; synthetic pairs when it does not exist.
        count: Pairs wanted.
        max_length: Longest ``<s> prompt response </s>`` allowed, in tokens.
        seed: Seed of the synthetic generator.

    Returns:
        Canonical rows, in file order.
    """
    from stepwise_lit.data.readers import read_records
    from stepwise_lit.data.formats import to_canonical
    from stepwise_lit.data.tokenizer import load_tokenizer

    if path.exists():
        rows = to_canonical(read_records(path), "gsm8k", source=str(path), require_scores=False)
    else:
        from stepwise_lit.data.synthetic import generate_pairs

        rows = generate_pairs(4 * count, seed)
    tokenizer = load_tokenizer(None)

    def fits(row: dict, side: str) -> bool:
        return len(tokenizer(row["prompt"] + "".join(row[f"{side}_steps"])).input_ids) + 1 <= max_length

    selected = [row for row in rows if fits(row, "chosen") and fits(row, "rejected")][:count]
    if len(selected) < count:
        raise SystemExit(f"only {len(selected)} pairs fit max_length={max_length}; {count} needed")
    for row in selected:
        if row["rejected_step_scores"] is None:
            row["rejected_step_scores"] = [-1.0] * len(row["rejected_steps"])
    return selected


def token_rows(pairs: list[dict], max_length: int) -> list[dict]:
    """The package's token rows (``stepwise_lit.data.tokenize.tokenize_row``) for the pairs."""
    from stepwise_lit.data.tokenize import TokenizeSettings, tokenize_row
    from stepwise_lit.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    return [tokenize_row(pair, tokenizer, TokenizeSettings(max_length=max_length)) for pair in pairs]


def build_model(vocab_size: int | None = None):
    """The bench model (fp32, dropout off) from the package's tiny-model builder, seed 0, its
    vocabulary padded to `vocab_size` rows (None: the byte tokenizer's 259)."""
    from stepwise_lit.models.loading import TinyModelConfig, build_tiny_model
    from stepwise_lit.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    return pad_vocabulary(build_tiny_model(load_tokenizer(None), TinyModelConfig(**BENCH_MODEL)), vocab_size)


def pad_vocabulary(model, vocab_size: int | None):
    """`model` with its input embedding and LM head padded to `vocab_size` rows (in place).

    The new rows are N(0, 0.02²) from a generator seeded 1, so every side gets the same
    weights whatever its global RNG state; existing ids keep their rows."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    old_size, hidden = embedding.weight.shape
    if vocab_size is None or vocab_size == old_size:
        return model
    if vocab_size < old_size:
        raise SystemExit(f"--vocab-size {vocab_size} is below the tokenizer's {old_size} tokens")
    generator = torch.Generator().manual_seed(1)
    for layer in (embedding, head):
        extra = 0.02 * torch.randn(vocab_size - old_size, hidden, generator=generator)
        layer.weight = torch.nn.Parameter(torch.cat([layer.weight.data, extra.to(layer.weight.dtype)]))
    embedding.num_embeddings = head.out_features = vocab_size
    model.config.vocab_size = vocab_size
    return model


# ----------------------------------------------------------------------------- measurements
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


# ----------------------------------------------------------------------------- results


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, floats to 4 significant digits, a ``|`` in a cell escaped."""

    def line(cells) -> str:
        return "| " + " | ".join((f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|") for v in cells) + " |"

    return "\n".join([line(headers), line("---" for _ in headers), *map(line, rows)])


def add_write_option(parser, name: str) -> None:
    """The command's ``--write [FILE.md]`` option (alone: ``docs/results/<name>.md``)."""
    parser.add_argument(
        "--write", type=Path, nargs="?", const=RESULTS / f"{name}.md", default=None, metavar="FILE.md",
        help=f"also write what is printed, under the command line and seed, to FILE.md and the JSON summary to "
             f"FILE.json (no FILE: docs/results/{name}.md)",
    )


class Report:
    """What a bench command prints, kept for its results file.

    Args:
        doc: The command's docstring (its first sentence is the file's title).
        seed: What the command's seeds are, written under the command line.
    """

    def __init__(self, doc: str, seed: str) -> None:
        self.title = " ".join(doc.strip().split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        self.seed = seed
        self.lines: list[str] = []

    def say(self, text: str = "") -> None:
        """Print a line (or lines) of the results."""
        print(text, flush=True)
        self.lines.append(text)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Print a `markdown_table` of the results."""
        self.say(markdown_table(headers, rows))

    def finish(self, summary: dict, path: Path | None) -> None:
        """Print `summary` as the last stdout line (JSON); with `path`, write what was said to the
        markdown file `path` under the command line, its seed, the date, the machine and the load, and
        ``{"command", "seed", "summary"}`` to `path` with the suffix ``.json``."""
        print(json.dumps(summary))
        if path is None:
            return
        command = shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]])
        machine = (f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, load average "
                   f"{os.getloadavg()[1]:.2f} over the last 5 min at the end")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {self.title}\n\nWritten by `{command}` on {time.strftime('%Y-%m-%d', time.gmtime())}; "
                        f"seed {self.seed}; {machine}.\n\n" + "\n\n".join(self.lines) + "\n")
        path.with_suffix(".json").write_text(json.dumps({"command": command, "seed": self.seed, "summary": summary},
                                                        indent=2) + "\n")
