"""Generation under FSDP2 (`ModelParallelStrategy`, 2 CPU processes, gloo) as the README runs it:
`train.py fit --config configs/tiny.yaml --config configs/fsdp.yaml`, shrunk by one more file.

The policy is a saved model folder whose greedy continuation is known by hand: a Llama that
counts down (`countdown_llama`): after digit d it writes d-1, after 0 the end of sequence. A
prompt ending in d therefore gets the completion "(d-1)...0", d tokens long, so the shards of
the two ranks finish their `generate` batches at different steps; a rank that stopped stepping
early would leave the other's sharded forward waiting on its all-gathers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from stepwise_lit.cli import main
from stepwise_lit.data.tokenizer import BYTE_TOKEN_OFFSET, load_tokenizer
from tests.helpers.entry import run_entry, write_pairs
from tests.helpers.launch import Run, environment
from tests.helpers.paths import REPO

DIGITS = [3, 6, 1, 7, 4, 2, 5]  # the last character of the 7 held-out prompts
RIGHT = {0, 2, 4, 6}  # the prompts whose reference is the countdown (the others' is not)


def byte_id(character: str) -> int:
    return ord(character) + BYTE_TOKEN_OFFSET


def countdown_llama(tokenizer) -> LlamaForCausalLM:
    """A 1-layer Llama whose next token is a fixed function of the current one, with certainty:
    digit d -> d-1, 0 -> EOS. Attention and MLP outputs are zero, so the last hidden state is the
    current token's embedding; the digits get one-hot embeddings and the head maps each to its
    successor with logit 10 (all others 0 after the one-hot's norm)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for digit in range(10):
            model.model.embed_tokens.weight[byte_id(str(digit))] = torch.nn.functional.one_hot(torch.tensor(digit), 32)
            successor = tokenizer.eos_token_id if digit == 0 else byte_id(str(digit - 1))
            model.lm_head.weight[successor, digit] = 10.0
    return model


def countdown(digit: int) -> str:
    """The model's greedy completion after a prompt ending in `digit`."""
    return "".join(str(d) for d in range(digit - 1, -1, -1))


def model_folder(folder: Path) -> Path:
    tokenizer = load_tokenizer(None)
    countdown_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def held_out_rows(path: Path) -> float:
    """Writes 7 held-out pairs whose prompts end in `DIGITS`; a prompt in `RIGHT` has its
    countdown as the reference answer ("#### 210"), the others a wrong one. Returns the solve
    rate that grading each prompt once gives (4 of 7)."""
    rows = write_pairs(path, len(DIGITS))
    for index, (row, digit) in enumerate(zip(rows, DIGITS)):
        row["prompt"] = f"Problem {index}: count down from {digit}"
        row["reference_solution"] = f"#### {countdown(digit) if index in RIGHT else 99}"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(RIGHT) / len(DIGITS)


def shrunk(folder: Path, model: Path, cache: Path) -> Path:
    """One optimizer step at learning rate 0 (the weights stay the folder's) on `folder`'s
    train.jsonl, then the validation with the solve-rate evaluation of the 7 held-out prompts of
    its val.jsonl, 2 per `generate` batch."""
    config = {
        "trainer": {"max_steps": 1, "val_check_interval": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(folder / "run"), "callbacks": []},
        "model": {"model_name_or_path": str(model), "optimizer": {"class_path": "torch.optim.AdamW",
                                                                   "init_args": {"lr": 0.0, "weight_decay": 0.0}}},
        "evaluation": {"source": "gsm8k", "max_prompts": len(DIGITS),
                       "generation": {"max_new_tokens": 12, "batch_size": 2}},
        "data": {"path": str(folder / "train.jsonl"), "val_path": str(folder / "val.jsonl"), "format": "stepwise",
                 "batch_size": 2, "cache_dir": str(cache)},
    }
    path = folder / "shrink.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(*configs: Path, cwd: Path) -> subprocess.CompletedProcess:
    arguments = [argument for config in configs for argument in ("--config", str(config))]
    return subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *arguments], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fsdp2_solve_rate_equals_one_process_and_the_hand_count(tmp_path, capsys):
    """The README's FSDP2 command logs `val/solve_rate` 4/7: each of the 7 prompts graded once
    (rank 0 decodes prompts 0, 2, 4, 6, rank 1 prompts 1, 3, 5 and a repeat of weight 0), the
    same as one process running tiny.yaml alone. Counting the repeat would give 4/8 or 5/8."""
    model = model_folder(tmp_path / "model")
    runs = {}
    for name in ("one", "fsdp2"):
        folder = tmp_path / name
        folder.mkdir()
        expected = held_out_rows(folder / "val.jsonl")
        write_pairs(folder / "train.jsonl", 8)
        configs = [REPO / "configs" / "tiny.yaml", shrunk(folder, model, tmp_path / "cache")]
        if name == "one":  # in this process
            outcome = run_entry(main, ["fit", *(a for c in configs for a in ("--config", str(c)))], capsys)
            assert outcome.code == 0, outcome.err[-4000:]
        else:
            result = train(configs[0], REPO / "configs" / "fsdp.yaml", configs[1], cwd=folder)
            assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = Run(folder / "run").metrics()
    assert expected == pytest.approx(4 / 7)
    assert runs["one"]["val/solve_rate"] == pytest.approx(expected, abs=1e-6)
    assert runs["fsdp2"]["val/solve_rate"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_fsdp2_online_round_decodes_unequal_shards_in_lockstep(tmp_path):
    """configs/online_tiny.yaml under FSDP2 with a LoRA policy: one round of 3 prompts, 1 prompt per
    `generate` batch, so rank 0 decodes 2 batches and rank 1 one prompt and a dropped repeat. The round's
    solutions are each prompt's countdown, every prompt once, in prompt order; with reference
    fallback each prompt gives a pair (its samples are graded wrong), and the validation after
    the round logs the hand-counted solve rate (learning rate 0: the adapters stay zero, the policy
    the folder's model)."""
    model = model_folder(tmp_path / "model")
    rows = write_pairs(tmp_path / "train.jsonl", 8)
    for index, row in enumerate(rows):
        row["prompt"] = f"Training problem {index}: count down from {index % 9 + 1}"
        row["reference_solution"] = "#### 99"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = held_out_rows(tmp_path / "val.jsonl")
    config = yaml.safe_load(shrunk(tmp_path, model, tmp_path / "cache").read_text())
    config["trainer"].update({"max_steps": -1, "max_epochs": 2, "val_check_interval": None})
    # LoRA: PEFT's generate calls the inner model, so the FSDP2 root's weights must be gathered for it
    config["model"].update({"sft_warmup_steps": 0, "lora": {"r": 4}})
    config["online"] = {"prompts_per_round": 3, "steps_per_round": 2, "answer_source": "gsm8k",
                        "pairs": {"reference_fallback": True},
                        "generation": {"do_sample": True, "num_samples": 2, "max_new_tokens": 12, "batch_size": 1}}
    (tmp_path / "shrink.yaml").write_text(yaml.safe_dump(config))
    result = train(REPO / "configs" / "online_tiny.yaml", REPO / "configs" / "fsdp.yaml", tmp_path / "shrink.yaml",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    round_0 = tmp_path / "run" / "online" / "round-0"
    solutions = [json.loads(line) for line in (round_0 / "solutions.jsonl").read_text().splitlines()]
    assert [s["prompt_id"] for s in solutions] == ["0", "0", "1", "1", "2", "2"]
    assert len({s["prompt"] for s in solutions}) == 3
    for solution in solutions:
        assert solution["completion"] == countdown(int(solution["prompt"][-1])), solution
    assert json.loads((round_0 / "summary.json").read_text())["pairs"] == 3
    assert Run(tmp_path / "run").metrics()["val/solve_rate"] == pytest.approx(expected, abs=1e-6)
