"""The evaluation report (stepwise_lit.evaluation.report) of `validate` and `test` on a tiny run."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stepwise_lit.cli import main
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.evaluation.preference import PreferenceMetrics
from stepwise_lit.evaluation.processbench import LabelledStepRewards
from stepwise_lit.evaluation.report import StepRewardReport, build_report, processbench_values
from stepwise_lit.evaluation.figures import report_figures
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule
from tests.helpers.paths import REPO

TINY_SHAPE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
DATA = {
    "synthetic_train_size": 16, "synthetic_val_size": 8, "batch_size": 4,
    "max_length": 512, "max_prompt_length": 32, "synthetic_max_value": 10,
}
TINY_ARGS = [
    "--config", str(REPO / "configs" / "tiny.yaml"),
    *(f"--model.tiny_model.{name}={value}" for name, value in TINY_SHAPE.items()),
    *(f"--data.{name}={value}" for name, value in DATA.items()),
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    # the schedule the tests read, pinned here rather than taken from the main job's recipe
    "--trainer.max_epochs=2", "--trainer.val_check_interval=0.5", "--model.sft_warmup_steps=0",
    "--evaluation.enabled=false",  # the generation evaluation has tests of its own (tests/unit/evaluation/test_generation.py)
]
PLOTS = {"step_accuracy_by_index.png", "step_reward_distribution.png", "training_curves.png"}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Fit 2 epochs (4 steps each, validation twice an epoch), then validate the last checkpoint."""
    root = tmp_path_factory.mktemp("report")
    main(["fit", *TINY_ARGS, f"--trainer.default_root_dir={root}", "--trainer.log_every_n_steps=1"])
    report_after_fit = (root / "report").exists()
    checkpoint = root / "checkpoints" / "last.ckpt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["validate", *TINY_ARGS, f"--trainer.default_root_dir={root}", f"--ckpt_path={checkpoint}"])
    folder = root / "report" / "val"
    return {
        "root": root,
        "checkpoint": checkpoint,
        "folder": folder,
        "report": json.loads((folder / "report.json").read_text()),
        "stdout": stdout.getvalue(),
        "report_after_fit": report_after_fit,
    }


def test_fit_writes_no_report(run):
    assert not run["report_after_fit"]


def test_report_metrics_are_the_logged_validation_metrics(run):
    """The report's metrics are what the module logged in the same validate run (own collection,
    same numbers), with first-error localisation; the header names the checkpoint and its step."""
    report = run["report"]
    assert report["stage"] == "val" and report["num_pairs"] == 8
    assert report["checkpoint"] == str(run["checkpoint"]) and report["global_step"] == 8
    (logged,) = read_csv(run["root"] / "csv" / "version_1" / "metrics.csv")
    for name, value in report["metrics"].items():
        assert value == pytest.approx(float(logged[f"val/{name}"]), rel=1e-5), name
    assert {"reward_accuracy", "step_accuracy", "first_error_accuracy", "first_error_distance"} <= set(report["metrics"])
    assert 0 <= report["metrics"]["first_error_accuracy"] <= 1


def test_step_counts_and_indices_match_the_validation_data(run):
    """Good/bad step counts are the val set's steps with g > 0 / g < 0; one accuracy per step index."""
    data = StepwiseDataModule(path="synthetic", seed=0, **DATA)
    data.setup("validate")
    scores = [s for side in ("chosen", "rejected") for row in data.val_dataset[f"{side}_step_scores"] for s in row]
    report = run["report"]
    assert report["step_rewards"]["good"]["count"] == sum(s > 0 for s in scores)
    assert report["step_rewards"]["bad"]["count"] == sum(s < 0 for s in scores)
    most_steps = max(len(row) for side in ("chosen", "rejected") for row in data.val_dataset[f"{side}_step_scores"])
    by_index = report["step_accuracy_by_index"]
    assert by_index["step"] == list(range(1, most_steps + 1))
    assert by_index["chosen"][0] is not None and by_index["rejected"][0] is not None
    assert all(0 <= v <= 1 for v in by_index["chosen"] + by_index["rejected"] if v is not None)
    assert sum(by_index["chosen_count"]) + sum(by_index["rejected_count"]) == sum(s != 0 for s in scores)
    assert by_index["chosen_count"][0] == 8


def test_history_comes_from_the_checkpoint_run(run):
    """Training curves are read from the fit run's metrics.csv (not the validate run's own):
    2 train epochs, 4 validations."""
    history = run["report"]["history"]
    assert history["source"] == str(run["root"] / "csv" / "version_0" / "metrics.csv")
    series = history["series"]
    assert len(series["train/reward_accuracy"]["step"]) == 2
    assert len(series["val/reward_accuracy"]["step"]) == 4 and len(series["val/reward_margin"]["value"]) == 4
    assert series["val/reward_accuracy"]["step"] == sorted(series["val/reward_accuracy"]["step"])


def test_plots_are_written_and_labelled(run):
    """The three PNGs open; every plot panel has x and y labels and a legend (the step count bars'
    twin axes has its own y label)."""
    assert set(run["report"]["plots"]) == PLOTS
    for name in PLOTS:
        with Image.open(run["folder"] / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300
    good, bad = torch.tensor([0.2, 0.5, -0.1]), torch.tensor([-0.4, 0.1])
    panels = {"step_accuracy_by_index": 1, "step_reward_distribution": 1, "training_curves": 2}
    for name, figure in report_figures(run["report"], good, bad, bins=10).items():
        assert all(axes.get_ylabel() for axes in figure.axes), name
        with_legend = [axes for axes in figure.axes if axes.get_legend() is not None]
        assert len(with_legend) == panels[name], name
        for axes in with_legend:
            assert axes.get_xlabel() and all(text.get_text() for text in axes.get_legend().get_texts()), name


def test_terminal_table(run):
    out = run["stdout"]
    assert "Step report: val, 8 pairs, global step 8" in out
    accuracy = run["report"]["metrics"]["first_error_accuracy"]
    assert any(line.split() == ["first_error_accuracy", f"{accuracy:.4f}"] for line in out.splitlines())
    assert f"written to {run['folder']}" in out


def test_tensorboard_gets_the_figures_and_histograms(run):
    events = EventAccumulator(str(run["root"] / "tensorboard" / "version_1"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {f"report/val/{Path(name).stem}" for name in PLOTS} <= set(tags["images"])
    assert {"report/val/step_rewards_good", "report/val/step_rewards_bad"} <= set(tags["histograms"])


def test_switched_off_writes_nothing(tmp_path):
    main(["validate", *TINY_ARGS, f"--trainer.default_root_dir={tmp_path}", "--report.enabled=false"])
    assert not (tmp_path / "report").exists()


def test_test_stage_report_without_history(tmp_path):
    """`trainer.test` writes a `test` report; without a checkpoint there are no training curves."""
    data = StepwiseDataModule(path="synthetic", seed=0, **DATA)
    data.setup("validate")
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[StepRewardReport(dirpath=str(tmp_path / "out"))], default_root_dir=tmp_path,
    )
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        trainer.test(StepwiseDPOModule(tiny_model=TinyModelConfig(**TINY_SHAPE)), dataloaders=data.val_dataloader())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stage"] == "test" and report["num_pairs"] == 8 and report["history"] is None
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == sorted(PLOTS - {"training_curves.png"})
    assert "no metrics.csv found" in stdout.getvalue()


def test_report_json_writes_counts_as_integers(run):
    """Pair and step counts are whole numbers (0/1 pair weights), so report.json writes `8`, not `8.0`."""
    text = (run["folder"] / "report.json").read_text()
    assert '"num_pairs": 8,' in text
    report = run["report"]
    by_index = report["step_accuracy_by_index"]
    counts = [report["num_pairs"], *by_index["chosen_count"], *by_index["rejected_count"]]
    counts += [summary["count"] for summary in report["step_rewards"].values()]
    assert all(type(count) is int for count in counts), counts


def _step_report(weight: torch.Tensor) -> dict:
    """`build_report` of one pair per weight, 2 real steps per response (g = +1 then -1)."""
    n = len(weight)
    metrics = PreferenceMetrics(max_step_index=3)
    metrics.update(
        rewards=torch.zeros(2 * n), step_rewards=torch.zeros(2 * n, 2), step_scores=torch.tensor([[1.0, -1.0]] * 2 * n),
        step_mask=torch.ones(2 * n, 2, dtype=torch.bool), verifier_rewards=torch.zeros(2 * n), logps=torch.zeros(2 * n),
        num_pairs=n, weight=weight,
    )
    return build_report("val", metrics.compute(), torch.zeros(0), torch.zeros(0), float(weight.sum()),
                        checkpoint=None, global_step=0, history=None, history_source=None)


def test_counts_are_ints_for_whole_weights_and_floats_for_fractional_ones():
    """Weights (1, 1, 0): 2 pairs, 2 steps per index and side. Weights (1, 0.5): 1.5 pairs and
    1.5 steps, kept as floats rather than rounded."""
    whole = json.loads(json.dumps(_step_report(torch.tensor([1.0, 1.0, 0.0]))))
    assert type(whole["num_pairs"]) is int and whole["num_pairs"] == 2
    assert whole["step_accuracy_by_index"]["chosen_count"] == [2, 2]
    assert all(type(c) is int for c in whole["step_accuracy_by_index"]["rejected_count"])
    fractional = _step_report(torch.tensor([1.0, 0.5]))
    assert fractional["num_pairs"] == 1.5 and fractional["step_accuracy_by_index"]["chosen_count"] == [1.5, 1.5]


def labelled_responses() -> dict[str, torch.Tensor]:
    """Four responses, two steps each, plus one of weight 0 (distributed padding) that must not count."""
    metric = LabelledStepRewards()
    metric.update(
        torch.tensor([[0.5, -1.0], [0.2, 0.3], [-0.4, 0.1], [-0.2, 0.4], [-9.0, 0.0]]),
        torch.ones(5, 2, dtype=torch.bool),
        torch.tensor([1, -1, 0, -1, 0]),
        torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]),
    )
    return metric.compute()


def test_processbench_values_at_a_given_threshold_by_hand():
    """Threshold 0: the first step below it is step 1, none, step 0, step 0; labels 1, -1, 0, -1.
    error_acc = 2/2, correct_acc = 1/2 (the last response is flagged at step 0), F1 = 2·1·0.5/1.5 = 2/3."""
    values = processbench_values(labelled_responses(), 0.75, 0.0, "report.threshold")
    assert values["num_erroneous"] == 2 and values["num_correct"] == 2
    assert values["error_acc"] == 1.0 and values["correct_acc"] == 0.5
    assert values["processbench_f1"] == pytest.approx(2 / 3)
    assert values["within_response_auroc"] == 0.75 and values["threshold_source"] == "report.threshold"


def test_processbench_values_choose_the_validation_threshold_by_hand():
    """Every response is right for thresholds in (-0.4, -0.2]; the smallest candidate there is
    the midpoint -0.3 (F1 1). Without a threshold or a validation source nothing is scored."""
    values = processbench_values(labelled_responses(), 0.75, None, "validation data")
    assert values["threshold"] == pytest.approx(-0.3) and values["processbench_f1"] == 1.0
    unscored = processbench_values(labelled_responses(), 0.75, None, None)
    assert unscored["threshold"] is None and unscored["processbench_f1"] is None and unscored["error_acc"] is None
