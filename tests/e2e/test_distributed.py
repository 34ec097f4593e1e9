"""Multi-process training from `train.py` on CPU (gloo, 2 processes): DDP and FSDP2 against one
process, global validation metrics, checkpoints without the reference, SIGKILL / SIGTERM and
resume, SIGINT and resume, a 2-node torchrun layout, and a NaN loss on one rank.

The runs share a tokenized-data cache and are reused across tests (module-scoped fixtures):
one process (in this process), DDP and FSDP2 each train the same 6 steps (an epoch and a half of 16 pairs,
global batch 4) and validate 7 pairs (odd, so a DDP shard is padded with a repeated row).
`tests.helpers.launch.Probe` is the callback the runs load: it appends one JSON line per rank
and step, so a killed run keeps what it wrote.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.launch import Run, finish, fit, free_port, start, wait_until_held
from tests.helpers.paths import REPO

STEPS, TRAIN_PAIRS, VAL_PAIRS, GLOBAL_BATCH = 6, 16, 7, 4
STEPS_PER_EPOCH = TRAIN_PAIRS // GLOBAL_BATCH


def write_config(
    root: Path, cache: Path, *, devices: int = 1, num_nodes: int = 1, strategy: str = "auto",
    checkpoint_every: int = 1, lora: dict | None = None, **probe,
) -> Path:
    """A fit config for the tiny model (with `lora`: LoRA settings on it): `STEPS` steps of the
    global batch, a checkpoint every `checkpoint_every` steps, the `Probe`."""
    config = {
        "seed_everything": 0,
        # one thread in every run, in-process or not: float sums then reduce in one order, and the
        # resumed runs' losses can be compared bit for bit (an earlier in-process fit may have set it)
        "num_threads": 1,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "num_nodes": num_nodes, "strategy": strategy, "precision": 32,
            "max_steps": STEPS, "default_root_dir": str(root), "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "gradient_clip_val": 1.0,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_last": True, "every_n_train_steps": checkpoint_every}},
                {"class_path": "tests.helpers.launch.Probe", "init_args": {"out_dir": str(root / "probe"), **probe}},
            ],
        },
        "model": {
            "tiny_model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001, "weight_decay": 0.0}},
            **({"lora": lora} if lora is not None else {}),
        },
        "data": {
            "path": "synthetic", "synthetic_train_size": TRAIN_PAIRS, "synthetic_val_size": VAL_PAIRS,
            "max_length": 1024, "batch_size": GLOBAL_BATCH // (devices * num_nodes), "seed": 0,
            "cache_dir": str(cache),
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def fit_here(config: Path, *args: str) -> Run:
    """`train.py fit` in this process (one-process runs; saves starting Python)."""
    from stepwise_lit.cli import main

    main(["fit", "--config", str(config), *args])
    return Run(config.parent)


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache) -> Run:
    """One process, batch 4 (the reference for every comparison)."""
    return fit_here(write_config(tmp_path_factory.mktemp("single"), cache))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, cache) -> Run:
    return fit(write_config(tmp_path_factory.mktemp("ddp"), cache, devices=2, strategy="ddp"))


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, cache) -> Run:
    root = tmp_path_factory.mktemp("fsdp2")
    return fit(write_config(root, cache, devices=2), "--config", str(REPO / "configs" / "fsdp.yaml"))


# ------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_ddp_and_fsdp2_losses_match_one_process(single, ddp, fsdp2):
    """Per-step losses of DDP and FSDP2 (2 ranks x 2 pairs) equal one process (4 pairs) on the
    same global batches, through the first epoch and an optimizer update each step."""
    reference = single.losses(world_size=1)
    assert len(reference) == STEPS
    for run in (ddp, fsdp2):
        losses = run.losses(world_size=2)
        for step in range(1, STEPS_PER_EPOCH + 1):
            assert losses[step] == pytest.approx(reference[step], abs=1e-4), (run.root.name, step)
    assert len(set(reference.values())) > 1, "the loss never changed: nothing was trained"


@pytest.mark.slow
def test_validation_metrics_are_global_and_skip_padding_rows(single, ddp, fsdp2):
    """The 7 validation pairs split 4 + 4 over 2 ranks (one repeated row, weight 0). The logged
    metrics and losses, reduced across ranks, equal one process's; `val/chosen_logps` differs per
    row and per rank, so a figure from one rank, or one counting the repeat, would differ."""
    expected = single.metrics()
    for run in (ddp, fsdp2):
        values = run.metrics()
        for name in ("val/chosen_logps", "val/rejected_logps", "val/reward_accuracy", "val/reward_margin",
                     "val/loss", "val/sft_loss"):
            assert values[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), (run.root.name, name)
        local = [run.records(rank, "val")[-1] for rank in (0, 1)]
        assert [r["total_weight"] for r in local] == [4.0, 3.0]  # rank 1's fourth row is the repeat
        means = [r["weighted_sum"] / r["total_weight"] for r in local]
        assert abs(means[0] - means[1]) > 1.0  # the value differs per rank
        global_mean = sum(r["weighted_sum"] for r in local) / VAL_PAIRS
        assert values["val/chosen_logps"] == pytest.approx(global_mean, rel=1e-5)


@pytest.mark.slow
def test_evaluation_report_under_ddp_counts_every_pair_once(single, tmp_path, cache):
    """`validate` of the one-process checkpoint with a 2-process DDP run writes one report (rank 0)
    whose figures are global: 7 pairs (not rank 0's 4, nor 8 with the repeated padding row), the
    same metrics and step-reward distributions as a one-process `validate`."""
    from stepwise_lit.cli import main

    checkpoint = str(single.root / "checkpoints" / "last.ckpt")
    here = write_config(tmp_path / "one", cache)
    main(["validate", "--config", str(here), "--ckpt_path", checkpoint])
    ddp_config = write_config(tmp_path / "two", cache, devices=2, strategy="ddp")
    finish(start(ddp_config, "--ckpt_path", checkpoint, subcommand="validate"))
    expected = json.loads((tmp_path / "one" / "report" / "val" / "report.json").read_text())
    actual = json.loads((tmp_path / "two" / "report" / "val" / "report.json").read_text())
    assert expected["num_pairs"] == actual["num_pairs"] == VAL_PAIRS
    for name, value in expected["metrics"].items():
        assert actual["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert actual["step_accuracy_by_index"].keys() == expected["step_accuracy_by_index"].keys()
    for key, values in expected["step_accuracy_by_index"].items():
        assert actual["step_accuracy_by_index"][key] == pytest.approx(values, rel=1e-4), key
    for kind in ("good", "bad"):
        assert actual["step_rewards"][kind] == pytest.approx(expected["step_rewards"][kind], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_reference_is_in_no_checkpoint_and_never_changes(single, ddp, fsdp2):
    from torch.distributed.checkpoint import FileSystemReader

    for run in (single, ddp):
        checkpoint = torch.load(run.root / "checkpoints" / "last.ckpt", weights_only=True)
        assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"policy"}
        assert checkpoint["state_dict"].keys() == {f"policy.{k}" for k in run.weights()}
    sharded = FileSystemReader(str(fsdp2.root / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata
    weights = [k for k in sharded if k.startswith("state_dict.")]
    assert weights and all(k.startswith("state_dict.policy.") for k in weights)
    assert "optimizer_0.state.policy.model.embed_tokens.weight.exp_avg" in sharded
    assert not any("reference" in k for k in sharded)
    for run, ranks in ((single, 1), (ddp, 2), (fsdp2, 2)):
        for rank in range(ranks):
            (end,) = run.records(rank, "end")
            assert end["reference_unchanged"] and not end["reference_grads"] and not end["reference_in_optimizer"]
    assert fsdp2.records(0, "end")[0]["reference_sharded"]


def assert_resumed_like(resumed: Run, uninterrupted: Run, stop_step: int, ranks: int) -> None:
    """Equal final weights; the resumed steps saw the uninterrupted run's losses and RNG draws."""
    assert max_abs_diff(resumed.weights(), uninterrupted.weights()) <= 1e-6, f"stopped after step {stop_step}"
    for rank in range(ranks):
        (start_record,) = resumed.records(rank, "start", last_start=True)
        assert start_record["start_step"] == stop_step, (start_record, stop_step)
        expected = {r["step"]: r for r in uninterrupted.records(rank)}
        steps = resumed.records(rank, last_start=True)
        assert [r["step"] for r in steps] == list(range(stop_step + 1, STEPS + 1))
        for record in steps:
            assert (record["loss"], record["draw"]) == (expected[record["step"]]["loss"], expected[record["step"]]["draw"])


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(single, tmp_path, cache):
    """SIGKILL (the whole process group) mid-epoch or in the second epoch, after a random step's
    checkpoint; `--ckpt_path last` ends on the same weights, losses and RNG draws. One process
    (the resume under DDP, of the checkpoint SIGTERM leaves: `test_sigterm_..._ddp`)."""
    config = write_config(tmp_path, cache, hold_after=random.randint(2, STEPS - 1))
    process = start(config)
    kill_step = wait_until_held(Run(tmp_path), process, ranks=1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (tmp_path / "probe" / "release").touch()  # the resumed run starts at the held step: do not hold again
    assert_resumed_like(fit_here(config, "--ckpt_path", "last"), single, kill_step, ranks=1)


@pytest.mark.slow
def test_sigkill_then_resume_with_lora_gives_the_uninterrupted_weights(tmp_path, cache):
    """With LoRA the checkpoints hold only the adapter (the base is rebuilt from the embedded
    model's saved RNG state): SIGKILL after a random step's checkpoint, `--ckpt_path last` ends on
    the uninterrupted run's merged weights (base + adapter, as exported), losses and RNG draws.
    One process: the DDP resume path is the plain one's (`test_sigterm_..._ddp`), and three DDP
    launches would cost the suite minutes."""
    lora = {"r": 4, "alpha": 16, "dropout": 0.1}  # all-linear; adapter dropout draws from the RNG
    uninterrupted = fit_here(write_config(tmp_path / "whole", cache, lora=lora))
    config = write_config(tmp_path / "killed", cache, lora=lora, hold_after=random.randint(2, STEPS - 1))
    process = start(config)
    kill_step = wait_until_held(Run(config.parent), process, ranks=1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (config.parent / "probe" / "release").touch()
    state = torch.load(config.parent / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state), "the checkpoint holds weights besides the adapter"
    resumed = fit_here(config, "--ckpt_path", "last")
    assert_resumed_like(resumed, uninterrupted, kill_step, ranks=1)


@pytest.mark.slow
def test_sigterm_to_rank_0_saves_a_checkpoint_that_resumes_like_the_uninterrupted_run_ddp(ddp, tmp_path, cache):
    """SIGTERM to rank 0 only, while both ranks wait before step 5: both finish step 5 and stop,
    `last.ckpt` (the only checkpoint: the periodic ones are off) holds the weights and loader
    position the uninterrupted run had after step 5, and the run exits 143; `--ckpt_path last`
    under DDP then ends on the uninterrupted DDP run's weights, losses and RNG draws (each rank's
    sampler position and RNG stream restored)."""
    config = write_config(tmp_path, cache, devices=2, strategy="ddp", checkpoint_every=1000, hold_after=4)
    process = start(config)
    wait_until_held(Run(tmp_path), process, ranks=2)
    process.send_signal(signal.SIGTERM)
    (tmp_path / "probe" / "release").touch()
    finish(process, expect=128 + signal.SIGTERM)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    weight_sum = sum(v.double().sum().item() for v in checkpoint["state_dict"].values())
    assert weight_sum == ddp.records(0)[4]["weight_sum"]
    assert [r["step"] for r in Run(tmp_path).records(1)] == [1, 2, 3, 4, 5]
    assert_resumed_like(fit(config, "--ckpt_path", "last"), ddp, 5, ranks=2)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_that_resumes_like_the_uninterrupted_run(single, tmp_path, cache):
    """Ctrl-C (SIGINT) to a one-process `train.py fit` while it waits before a random step: that
    step finishes, `last.ckpt` (the only checkpoint: the periodic ones are off) holds it, the run
    exits 130, and `--ckpt_path last` ends on the uninterrupted run's weights, losses and draws."""
    config = write_config(tmp_path, cache, checkpoint_every=1000, hold_after=random.randint(2, STEPS - 2))
    process = start(config)
    held_step = wait_until_held(Run(tmp_path), process, ranks=1)
    process.send_signal(signal.SIGINT)  # pending in the kernel: handled before the held step goes on
    (tmp_path / "probe" / "release").touch()
    finish(process, expect=128 + signal.SIGINT)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == held_step + 1
    resumed = fit_here(config, "--ckpt_path", "last")
    assert_resumed_like(resumed, single, held_step + 1, ranks=1)


@pytest.mark.slow
def test_two_node_torchrun_layout_skips_a_nan_step_on_every_rank(tmp_path, cache):
    """Two `torchrun --nnodes=2` launchers (one process each) on this machine: the CLI accepts
    `--trainer.num_nodes=2`. The two processes get different seeds, so each builds a different
    embedded model: DDP gives every rank rank 0's policy and the module rank 0's reference, so
    the first loss is log 2 on both. Rank 1's loss is NaN at step 2
    under `nonfinite_loss: skip`: both ranks skip that optimizer step (weights unchanged, count
    1), stay identical, and go on."""
    config = write_config(tmp_path, cache, devices=1, num_nodes=2, strategy="ddp", nan_step=2, nan_rank=1)
    torchrun = ("-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}")
    options = ("--trainer.max_steps=4", "--model.nonfinite_loss=skip")
    nodes = [start(config, *options, f"--seed_everything={n + 1}", launcher=(*torchrun, f"--node_rank={n}"))
             for n in (0, 1)]
    for node in nodes:
        finish(node)
    run = Run(tmp_path)
    starts = [run.records(rank, "start")[0] for rank in (0, 1)]
    assert [(s["world_size"], s["num_nodes"], s["node_rank"]) for s in starts] == [(2, 2, 0), (2, 2, 1)]
    steps = [run.records(rank) for rank in (0, 1)]
    assert [r["weight_sum"] for r in steps[0]] == [r["weight_sum"] for r in steps[1]]
    for records in steps:
        sums = [r["weight_sum"] for r in records]
        assert sums[1] == sums[0] and sums[2] != sums[1] and sums[3] != sums[2]
        assert [r["nonfinite"] for r in records] == [0, 1, 1, 1]
    assert [records[0]["loss"] for records in steps] == pytest.approx([math.log(2)] * 2)
    assert math.isnan(steps[1][1]["loss"]) and math.isfinite(steps[0][1]["loss"])
    assert (tmp_path / "export" / "model.safetensors").is_file()
