"""Faults: a checkpoint when a run is stopped by a signal, and the RNG state in checkpoints.

`CheckpointOnSignal` turns SIGTERM (a scheduler's preemption, `kill`) and SIGINT (Ctrl-C) into
the same orderly stop: finish the current training step, save `last.ckpt`, stop with
`SignalStop`, whose exit code is 128 + the signal's number (143, 130). `gather_rng_states` and
`set_rng_state` let a resumed run continue every rank's random streams.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("stepwise_lit")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop(SystemExit):
    """Raised at the step where a run stops after SIGTERM or SIGINT, once every rank agrees.

    A `SystemExit` whose `code` is ``128 + signum`` (the shell's convention: 143 for SIGTERM,
    130 for SIGINT), so a script that lets it propagate exits with that code.

    Args:
        signum: The signal that stopped the run (`signum` attribute, a `signal.Signals`).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signal.Signals(signum)


class CheckpointOnSignal(L.Callback):
    """Stops a run on SIGTERM or SIGINT after the current training step, saving `last.ckpt` in
    the `ModelCheckpoint` folder first, so `--ckpt_path last` resumes there.

    The signal handler only records the signal. After each training batch the ranks agree
    whether any of them got one (one small all-reduce; a second one only when stopping, to
    prefer SIGTERM when ranks got different signals), so every rank stops at the same step and
    the save (a collective under DDP and FSDP) runs on all of them. It then raises `SignalStop`,
    which Lightning hands to `on_exception` and re-raises. This replaces Lightning's SIGTERM
    handler, which runs a collective inside the handler and can deadlock a DDP run, and,
    during training, Python's SIGINT handler, whose `KeyboardInterrupt` can strike mid-step
    and which Lightning answers by stopping without a checkpoint. A second Ctrl-C raises
    `KeyboardInterrupt` at once (Lightning's graceful shutdown, exit code 1, no checkpoint), for a
    step or a validation that takes too long. Lightning restores the previous handlers when the
    run ends.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum)
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint after this training step, then stopping "
                        "(Ctrl-C again stops at once, without one)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        sigterm = strategy.reduce_boolean_decision(self.received == signal.SIGTERM, all=False)
        raise SignalStop(signal.SIGTERM if sigterm else signal.SIGINT)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SignalStop):
            return
        name = exception.signum.name
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            log.warning("stopped by %s; no checkpoint saved (the run has no ModelCheckpoint)", name)
            return
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        log.warning("stopped by %s after step %d; saved %s", name, trainer.global_step, path)



def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, in types that `torch.load`
    reads with `weights_only=True` (the numpy key array as a list)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, keys.tolist(), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order (a collective when distributed)."""
    state = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states
