"""Real architectures from a model folder: small random-weight Llama, Qwen2, Qwen3, Mistral, Gemma2
(softcapping), Gemma3, GPT-2 (Conv1D, tied embeddings), Phi, Phi-3 and GPT-NeoX models built from
their transformers configs (`tests.helpers.architectures`), each trained 2 steps from `train.py fit`
(a YAML file naming the folder as model and tokenizer) twice: packed with LoRA and `reference:
adapter`, and unpacked as a full fine-tune with `reference: copy`, both with `lean_logps: auto`
(off at the byte vocabulary's 259 rows; tests/unit/logprobs/test_lean.py covers the lean path).
For Gemma2 and GPT-2 the per-step log-probs of the packed and unpacked forwards equal a plain
per-sequence forward within 1e-4 nats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stepwise_lit.cli import main
from stepwise_lit.logprobs.forward import step_logps
from stepwise_lit.module import StepwiseDPOModule
from tests.helpers.architectures import ARCHITECTURES, model_folder
from tests.helpers.entry import logged_losses, run_entry, write_config
from tests.helpers.step_logps import pair_batches, per_sequence_step_logps

pytestmark = pytest.mark.slow

VARIANTS = {
    "packed_lora": {"model": {"lora": {"r": 4}, "reference": "adapter", "lean_logps": "auto"},
                    "data": {"pack_pairs": True}, "names_tokenizer": True},
    "unpacked_full": {"model": {"reference": "copy", "lean_logps": "auto"}, "data": {"pack_pairs": False},
                      "names_tokenizer": False},
}
"""The two fits of each architecture; the second names the folder as the model alone (the
tokenizer is read from it, as for a user's checkpoint on disk)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Every architecture's model folder (seed 0), built once for the module."""
    root = tmp_path_factory.mktemp("architectures")
    return {model_type: model_folder(root / model_type, model_type) for model_type in ARCHITECTURES}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_two_steps_from_a_model_folder(model_type, variant, folders, tmp_path, capsys):
    """Exit 0, two finite losses, and the exported weights moved from the folder's: with LoRA (merged
    into the export) the adapted linear layers only, the embeddings not; in the full fine-tune the
    embeddings too."""
    folder = str(folders[model_type])
    tokenizer = {"tokenizer_name_or_path": folder} if VARIANTS[variant]["names_tokenizer"] else {}
    changes = {"model": {"tiny_model": None, "model_name_or_path": folder, **tokenizer, **VARIANTS[variant]["model"]},
               "data": VARIANTS[variant]["data"]}
    config = write_config(tmp_path, changes, tmp_path / "cache")
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    root = tmp_path / "run"
    (hparams_file,) = (root / "csv").glob("version_*/hparams.yaml")
    assert yaml.safe_load(hparams_file.read_text())["tokenizer_name_or_path"] == folder  # the model's and the data's
    exported, built = (json.loads((path / "config.json").read_text()) for path in (root / "export", Path(folder)))
    assert exported["model_type"] == built["model_type"]
    losses = logged_losses(root)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    before = load_file(folders[model_type] / "model.safetensors")
    after = load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert sorted(after) == sorted(before)
    moved = {name for name in before if not torch.equal(after[name], before[name])}
    embeddings = {name for name in before if "embed" in name or name.endswith(("wte.weight", "wpe.weight"))}
    assert embeddings and moved - embeddings, moved
    assert bool(moved & embeddings) == (variant == "unpacked_full"), moved & embeddings


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2"])
def test_packed_step_logps_equal_a_per_sequence_forward(model_type, folders, tmp_path):
    """Four embedded pairs: the per-step log-probs of the packed and the unpacked forward equal each
    response's own forward, within 1e-4 nats absolute (fp32; responses of ~130 byte tokens, whose
    log-probs sum to about -700 nats, steps to about -150)."""
    module = StepwiseDPOModule(model_name_or_path=str(folders[model_type]))
    module.configure_model()
    unpacked, packed = pair_batches(tmp_path, str(folders[model_type]))
    num_steps = unpacked["step_mask"].shape[1]
    expected = per_sequence_step_logps(module.policy, unpacked, num_steps)
    assert expected.sum(1).min() < -500, "sums of several hundred nats"
    with torch.no_grad():
        for batch in (unpacked, packed):
            actual = step_logps(module.policy, batch, num_steps, module.lean).double()
            gap = (actual - expected)[unpacked["step_mask"]].abs().max()
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0, msg=f"greatest gap {gap:.4g} nats")
