"""Launching `train.py` in subprocesses (one process, DDP, torchrun) and reading what its runs wrote:
`Probe` (a callback the runs load by class path, `tests.helpers.launch.Probe`) appends one JSON
line per rank and step, so a killed run keeps what it wrote; `Run` reads those lines, the CSV log
and the export."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.paths import REPO

RUN_TIMEOUT = 240


class Probe(L.Callback):
    """Per rank and training step: the loss, a draw from the global RNG (so a resumed run can be
    checked to continue the RNG stream), the policy's weight sum and the skipped-step count; at the
    end, whether the reference's weights (this rank's shards) are unchanged and out of the optimizer.

    Args:
        out_dir: Folder of the `rank<r>.jsonl` files.
        nan_step: Global step (1-based) whose loss is made NaN (a step score set to NaN), or None.
        nan_rank: The rank that gets the NaN.
        hold_after: Once this many steps are done (and checkpointed), write a `held` record and
            wait until the file `<out_dir>/release` exists (at most `RUN_TIMEOUT` seconds), so a
            test can signal the run at a known step.
    """

    def __init__(self, out_dir: str, nan_step: int | None = None, nan_rank: int = 1, hold_after: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.nan_step = nan_step
        self.nan_rank = nan_rank
        self.hold_after = hold_after

    def write(self, trainer: L.Trainer, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reference_before = [local(p).clone() for p in pl_module.reference.model.parameters()]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, {"event": "start", "world_size": trainer.world_size, "node_rank": trainer.node_rank,
                             "num_nodes": trainer.num_nodes, "start_step": trainer.global_step})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.hold_after:
            self.write(trainer, {"event": "held", "step": trainer.global_step})
            deadline = time.monotonic() + RUN_TIMEOUT
            while not (self.out_dir / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.draw = torch.rand(()).item()
        if trainer.global_step + 1 == self.nan_step and trainer.global_rank == self.nan_rank:
            batch["step_scores"][0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weight_sum = sum(local(p).double().sum().item() for p in pl_module.policy.parameters())
        self.write(trainer, {"event": "step", "step": trainer.global_step, "loss": float(outputs["loss"]),
                             "draw": self.draw, "weight_sum": weight_sum, "nonfinite": pl_module.nonfinite_steps})

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """This rank's own (not yet reduced) state of `val/chosen_logps`."""
        mean = pl_module.val_metrics.pair_means["chosen_logps"]
        self.write(trainer, {"event": "val", "weighted_sum": mean.weighted_sum.item(), "total_weight": mean.total_weight.item()})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reference = list(pl_module.reference.model.parameters())
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.write(trainer, {
            "event": "end",
            "reference_unchanged": all(torch.equal(local(p), b) for p, b in zip(reference, self.reference_before)),
            "reference_grads": any(p.grad is not None for p in reference),
            "reference_in_optimizer": any(id(p) in optimized for p in reference),
            "reference_sharded": any(type(p).__name__ == "DTensor" for p in reference),
        })


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the local shard of an FSDP2 DTensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@dataclass
class Run:
    root: Path

    def records(self, rank: int = 0, event: str = "step", last_start: bool = False) -> list[dict]:
        """The probe's records of one kind; with `last_start`, only those since the last (re)start."""
        path = self.root / "probe" / f"rank{rank}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if last_start:
            records = records[max(i for i, r in enumerate(records) if r["event"] == "start") :]
        return [r for r in records if r["event"] == event]

    def losses(self, world_size: int) -> dict[int, float]:
        """Mean loss over ranks (each rank's loss is its share's mean; shares are equal) per step."""
        per_rank = [{r["step"]: r["loss"] for r in self.records(rank)} for rank in range(world_size)]
        return {step: sum(rank[step] for rank in per_rank) / world_size for step in per_rank[0]}

    def metrics(self) -> dict[str, float]:
        """The last logged value of each column of the CSV log."""
        import csv

        values: dict[str, float] = {}
        for path in sorted((self.root / "csv").glob("version_*/metrics.csv")):
            for row in csv.DictReader(path.open()):
                values.update({k: float(v) for k, v in row.items() if v != ""})
        return values

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.root / "export" / "model.safetensors")


def environment() -> dict[str, str]:
    """The repository first on the path (for `stepwise_lit` and `tests.helpers`, e.g. `Probe`), and
    no seed left by a run in this process (`seed_everything` exports `PL_GLOBAL_SEED`)."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    inherited = {k: v for k, v in os.environ.items() if k != "PL_GLOBAL_SEED"}
    return {**inherited, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def start(config: Path, *args: str, launcher: tuple[str, ...] = (), subcommand: str = "fit") -> subprocess.Popen:
    """Starts `train.py <subcommand>` in a new session (so the whole process group can be signalled)."""
    log_path = config.parent / f"train-{time.monotonic_ns()}.log"
    command = [sys.executable, *launcher, str(REPO / "train.py"), subcommand, "--config", str(config), *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=config.parent, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    process.log_path = log_path
    return process


def finish(process: subprocess.Popen, expect: int = 0) -> None:
    try:
        code = process.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = "timeout"
    if code != expect:
        log = process.log_path.read_text()
        pytest.fail(f"train.py exited with {code}, expected {expect}:\n{log[-4000:]}")


def fit(config: Path, *args: str) -> Run:
    finish(start(config, *args))
    return Run(config.parent)


def wait_until_held(run: Run, process: subprocess.Popen, ranks: int) -> int:
    """Waits until every rank's `Probe` holds (see `hold_after`) and returns the step."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        try:
            held = [run.records(rank, "held") for rank in range(ranks)]
        except FileNotFoundError:
            held = [[]]
        if all(held):
            return held[0][-1]["step"]
        assert process.poll() is None, process.log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, "the run never reached the step to hold at"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]
