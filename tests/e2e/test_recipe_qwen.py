"""The Qwen2.5-0.5B-Instruct recipe (configs/qwen2.5_0.5b_instruct_gsm8k_lora.yaml) end to end, the
commands of its header in order, on its locally built stand-in: a random Qwen2 of the same
architecture (grouped-query attention with q/k/v biases, tied embeddings), tiny, with the byte
tokenizer carrying a Qwen2.5-style chat template (tests/helpers/chat.py); a local folder laid out
as openai/gsm8k with a few real GSM8K rows in place of the hub id; no download. The overrides are
the ones the stand-in and the CPU need."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from stepwise_lit import evaluate, prepare, score
from stepwise_lit.cli import main as train
from stepwise_lit.data.collate import StepwiseCollator
from stepwise_lit.grading.answers import extract_answer
from tests.helpers.chat import (
    QWEN_STYLE_TEMPLATE,
    byte_ids,
    qwen_style_text,
    save_model_folder,
)
from tests.helpers.entry import run_entry
from tests.helpers.paths import REPO, SHARED_DATA
from tests.helpers.prm_models import prm_folder

RECIPE = REPO / "configs" / "qwen2.5_0.5b_instruct_gsm8k_lora.yaml"
GSM8K = SHARED_DATA / "gsm8k"
LEARNING_RATE = 1e-2
"""The stand-in's rate: at the recipe's 2e-5, two steps move no bf16 weight by a rounding step,
so a base that trained would not show."""


def tiny_qwen2(tokenizer) -> Qwen2ForCausalLM:
    """Qwen2.5-0.5B's architecture (GQA 14:2 there, 4:2 here; q/k/v biases; tied embeddings;
    rope theta 1e6), hidden size 32, two layers."""
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


GSM8K_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
  - split: test
    path: main/test.jsonl
---
"""


def gsm8k_folder(folder, train_rows: int, test_rows: int) -> str:
    """A local folder laid out as the hub's openai/gsm8k (configuration ``main``, splits ``train``
    and ``test``) with the first rows of the shared GSM8K files, read offline by ``datasets``."""
    (folder / "main").mkdir(parents=True)
    for split, count in (("train", train_rows), ("test", test_rows)):
        lines = (GSM8K / f"{split}.jsonl").read_text().splitlines(keepends=True)[:count]
        (folder / "main" / f"{split}.jsonl").write_text("".join(lines))
    (folder / "README.md").write_text(GSM8K_README)
    return str(folder)


def metrics(root) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv, empty cells left out."""
    (path,) = (root / "csv").glob("version_*/metrics.csv")
    return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(path.open())]


def lora_deltas(adapter: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Base weight key -> scaling * B @ A, from a saved peft adapter's tensors."""
    deltas = {}
    for key, lora_a in adapter.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
            deltas[f"{module}.weight"] = scaling * lora_b.float() @ lora_a.float()
    return deltas


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="shared GSM8K data not present")
def test_the_qwen_recipe_runs_end_to_end_on_its_stand_in(tmp_path, tmp_path_factory, monkeypatch, capsys):
    recipe = yaml.safe_load(RECIPE.read_text())
    stand_in = save_model_folder(tmp_path / "qwen2.5-stand-in", QWEN_STYLE_TEMPLATE, build=tiny_qwen2)
    root, pairs = tmp_path / "run", tmp_path / "data" / "gsm8k_train_pairs.jsonl"

    # 1. prepare: the recipe's command, a local folder of 10 train rows in place of openai/gsm8k.
    hub = gsm8k_folder(tmp_path / "openai-gsm8k", train_rows=10, test_rows=5)
    argv = ["--data.format", "gsm8k", "--data.path", hub, "--data.name", "main", "--data.split", "train",
            "--output", str(pairs)]
    outcome = run_entry(prepare.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) == 10 and all(-1.0 in row["rejected_step_scores"] for row in rows)

    # 2. fit, recording the first training batch's ids.
    batches = []
    collate = StepwiseCollator.__call__
    monkeypatch.setattr(StepwiseCollator, "__call__",
                        lambda self, rows: batches.append(collate(self, rows)) or batches[-1])
    overrides = [
        f"--model.model_name_or_path={stand_in}", f"--model.optimizer.init_args.lr={LEARNING_RATE}",
        f"--data.path={pairs}", f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu", "--data.num_workers=0", "--num_threads=1",
        "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=1", "--data.batch_size=2",
        "--data.val_fraction=0.2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        "--data.max_length=2048", "--data.max_prompt_length=1024",  # byte tokens: ~4 per Qwen token
        "--evaluation.max_prompts=2", "--evaluation.generation.max_new_tokens=4",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]
    outcome = run_entry(train, ["fit", "--config", str(RECIPE), *overrides], capsys)
    assert outcome.code == 0, outcome.err[-3000:]

    # The chat template reached the training ids: the first row starts with the rendered prompt
    # (the recipe's step-wise template as the user turn, Qwen's default system turn), then step 1.
    prompt = batches[0]["prompts"][0]
    chosen = next(row["chosen_steps"] for row in rows if row["prompt"] == prompt)
    user = recipe["data"]["step_wise_prompt_template"].replace("{prompt}", prompt)
    expected = byte_ids(qwen_style_text(user)) + byte_ids(chosen[0])[1:]
    assert batches[0]["input_ids"][0, : len(expected)].tolist() == expected

    # The reference is the adapter-disabled policy: at step 1 (B = 0) every log-ratio is 0, so both
    # losses are log 2; at step 2 the adapters have moved the policy off it.
    logged = metrics(root)
    losses = [row["train/loss"] for row in logged if "train/loss" in row]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and abs(losses[1] - math.log(2)) > 1e-4
    fit_val = next(row for row in logged if "val/reward_margin" in row)

    # The export loads with AutoModelForCausalLM: merged weights = the stand-in's + (alpha / r) B A on
    # every linear layer (all-linear: q/k/v/o/gate/up/down, not the tied LM head); nothing else changed.
    export = root / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert isinstance(model, Qwen2ForCausalLM) and model.config.tie_word_embeddings
    lora = recipe["model"]["lora"]
    adapter = load_file(export / "adapter" / "adapter_model.safetensors")
    assert {value.dtype for value in adapter.values()} == {torch.float32}  # over the bf16 base
    deltas = lora_deltas(adapter, lora["alpha"] / lora["r"])
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {key.split(".")[-2] for key in deltas} == linear
    assert len(deltas) == len(linear) * 2 and all(delta.abs().max() > 0 for delta in deltas.values())  # B left 0
    base = load_file(f"{stand_in}/model.safetensors")
    merged = {key: value.float() for key, value in load_file(export / "model.safetensors").items()}
    assert merged.keys() == base.keys()
    bf16 = {key: value.to(torch.bfloat16).float() for key, value in base.items()}  # model.dtype: bfloat16
    for key, weight in bf16.items():  # within bf16 rounding of the sum; a base that trained is ~1e-3 off
        delta = deltas.get(key, torch.zeros_like(weight))
        excess = ((merged[key] - weight - delta).abs() - 2**-7 * (weight.abs() + delta.abs())).max().item()
        assert excess <= 0, (key, excess)
    assert all(torch.equal(merged[key], bf16[key]) for key in base if key not in deltas)

    # 3. validate from the last checkpoint: the trained adapter is restored (the rewards of the fit's
    # validation after step 2, off 0: the reference stayed the base) and the solve rate is graded.
    checkpoint = root / "checkpoints" / "last.ckpt"
    outcome = run_entry(train, ["validate", "--config", str(RECIPE), *overrides, f"--ckpt_path={checkpoint}"], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    validated = json.loads((root / "report" / "val" / "report.json").read_text())
    for name in ("chosen_reward", "rejected_reward", "reward_margin"):
        assert validated["metrics"][name] == pytest.approx(fit_val[f"val/{name}"], abs=1e-6), name
    assert abs(fit_val["val/chosen_reward"]) > 1e-4
    assert validated["generation"]["num_prompts"] == 2 and 0 <= validated["metrics"]["solve_rate"] <= 1

    # 4. evaluate the export on the folder's GSM8K test problems (3 of its 5 asked).
    test_rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:3]]
    argv = ["--model.model_name_or_path", str(export), "--data.path", hub, "--data.name", "main",
            "--data.split", "test", "--data.format", "gsm8k", "--evaluation.source", "gsm8k",
            "--evaluation.max_prompts", "3", "--evaluation.generation.max_new_tokens", "4",
            "--trainer.accelerator", "cpu", "--output", str(tmp_path / "eval_test")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    report = json.loads((tmp_path / "eval_test" / "report.json").read_text())
    assert report["num_prompts"] == 3 and 0 <= report["solve_rate"] <= 1
    references = [extract_answer(row["answer"], "gsm8k") for row in test_rows]  # GSM8K's "#### N"
    assert [example["reference"] for example in report["examples"]] == references

    # The header's optional scoring: configs/score_qwen_prm.yaml with a Qwen2.5-Math-PRM stand-in.
    scored = tmp_path / "data" / "gsm8k_train_prm.jsonl"
    argv = ["--config", str(REPO / "configs" / "score_qwen_prm.yaml"), "--only_missing", "false",
            "--input", str(pairs), "--output", str(scored),
            f"--scorer.init_args.model_name_or_path={prm_folder(tmp_path_factory, 'qwen_prm')}",
            "--scorer.init_args.dtype=float32", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
            "--trainer.enable_progress_bar=false"]
    outcome = run_entry(score.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    written = [json.loads(line) for line in scored.read_text().splitlines()]
    for row, source in zip(written, rows, strict=True):
        for side in ("chosen", "rejected"):
            assert len(row[f"{side}_step_scores"]) == len(source[f"{side}_steps"])
            assert all(-1 <= value <= 1 for value in row[f"{side}_step_scores"])
    assert any(row["rejected_step_scores"] != source["rejected_step_scores"] for row, source in zip(written, rows))
