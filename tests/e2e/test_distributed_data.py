"""The DataModule under a 2-process DDP run on CPU: each rank sees its own rows, data is prepared once.

Run as a script, this file is the training job the test launches (Lightning's DDP
launcher starts the second process by running it again).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

NUM_ROWS, VAL_FRACTION = 24, 0.25  # 18 train rows (9 per rank), 6 validation rows (3 per rank)


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_rows_and_prepare_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_ROWS
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    train = [set(rank["train"]) for rank in seen]
    val = [set(rank["val"]) for rank in seen]
    assert [len(rank["train"]) for rank in seen] == [9, 9]  # each row once per rank
    assert not train[0] & train[1]
    assert not val[0] & val[1]
    assert [len(rank) for rank in val] == [3, 3]
    all_prompts = {row["prompt"] for row in rows}
    assert train[0] | train[1] | val[0] | val[1] == all_prompts
    assert not (train[0] | train[1]) & (val[0] | val[1])
    assert result.stderr.count("tokenized data saved at") == 1  # prepare_data ran on one rank only


def run_ddp_job(out_dir: Path) -> None:
    """Write synthetic pairs, then fit a one-parameter module for one epoch on 2 CPU processes,
    each writing the prompts it saw."""
    import logging

    import lightning as L
    import torch

    from stepwise_lit.data.datamodule import StepwiseDataModule
    from stepwise_lit.data.synthetic import generate_pairs

    logging.basicConfig(level=logging.INFO)
    data_file = out_dir / "pairs.jsonl"
    if "LOCAL_RANK" not in os.environ:  # the launching process, before it starts rank 1
        data_file.write_text("".join(json.dumps(row) + "\n" for row in generate_pairs(NUM_ROWS, seed=4)))

    class RecordingModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.seen = {"train": [], "val": []}

        def training_step(self, batch, batch_index):
            self.seen["train"] += batch["prompts"]
            return (self.weight * batch["attention_mask"].float().mean()).sum()

        def validation_step(self, batch, batch_index):
            self.seen["val"] += batch["prompts"]

        def on_fit_end(self):
            (out_dir / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    datamodule = StepwiseDataModule(
        path=str(data_file), format="stepwise", val_fraction=VAL_FRACTION, batch_size=4, group_by_length=True,
        cache_dir=str(out_dir / "cache"),
    )
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(RecordingModule(), datamodule=datamodule)


if __name__ == "__main__":
    run_ddp_job(Path(sys.argv[1]))
