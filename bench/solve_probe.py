"""Can the embedded task be solved from its prompt? Greedy solve rate of a policy on held-out problems.

Trains `configs/tiny.yaml`'s SFT warm-up only (or takes an exported folder), greedy-decodes the
prompts of `generate_pairs(--num_problems, seed=--problem_seed, max_value=<the run's
data.synthetic_max_value>)` (problems the training data, `data.seed` 0, does not hold) with the
prompt template and prompt budget of training, reads each answer after "The answer is"
(`stepwise_lit.grading.answers`), and prints the solve rate next to the constant-answer baseline (the share
of the most common reference answer: what always answering one value scores).

    python bench/solve_probe.py --sft_steps 350 --root runs/solve_probe   # trains, then probes
    python bench/solve_probe.py --export runs/tiny/export                 # probes an exported policy
    python bench/solve_probe.py --write          # ... and docs/results/solve_probe.md (+ .json)

Training is `python train.py fit --config configs/tiny.yaml --model.sft_warmup_steps=N
--trainer.max_steps=N --trainer.limit_val_batches=0 --trainer.default_root_dir=<root>` plus any
`--train_args`; a root that already holds an export is probed without training again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/solve_probe.py`: this checkout's bench

from bench.common import REPO, Report, add_write_option  # noqa: E402
from stepwise_lit.data.chat import prompt_format_of  # noqa: E402
from stepwise_lit.data.synthetic import generate_pairs  # noqa: E402
from stepwise_lit.grading.answers import answers_match, extract_embedded  # noqa: E402
from stepwise_lit.models.generate import GenerationSettings, TransformersGenerator  # noqa: E402


def train_sft(sft_steps: int, root: Path, config: Path, train_args: list[str]) -> Path:
    """Runs the SFT warm-up only into `root`; returns its export folder."""
    export = root / "export"
    if not (export / "model.safetensors").is_file():
        command = [
            sys.executable, str(REPO / "train.py"), "fit", "--config", str(config),
            f"--model.sft_warmup_steps={sft_steps}", f"--trainer.max_steps={sft_steps}",
            "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false", *train_args,
        ]
        subprocess.run(command, check=True, cwd=REPO)
    return export


def solve_rate(export: Path, num_problems: int, problem_seed: int) -> dict:
    """Greedy solve rate of the exported policy and the constant-answer baseline on held-out problems."""
    torch.set_num_threads(1)
    data = json.loads((export / "stepwise_config.json").read_text())["data"]
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    problems = generate_pairs(num_problems, seed=problem_seed, max_value=data["synthetic_max_value"])
    generator = TransformersGenerator(model, tokenizer, prompt_format_of(data), data["max_prompt_length"], progress=False)
    # the longest solution has 8 lines; the budget stops a model that never ends
    settings = GenerationSettings(max_new_tokens=256, max_steps=8, batch_size=50)
    completions = generator.generate([problem["prompt"] for problem in problems], settings)
    references = [extract_embedded(problem["reference_solution"]) for problem in problems]
    answers = [extract_embedded(texts[0]) for texts in completions]
    solved = sum(answers_match(answer, reference, "embedded") for answer, reference in zip(answers, references))
    _, most_common = Counter(references).most_common(1)[0]
    return {
        "solve_rate": solved / num_problems,
        "constant_answer_baseline": most_common / num_problems,
        "answered": sum(answer is not None for answer in answers) / num_problems,
        "example": completions[0][0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, help="probe this exported folder (no training)")
    parser.add_argument("--sft_steps", type=int, default=350, help="SFT warm-up steps to train (tiny.yaml: 350)")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "solve_probe", help="scratch root of the run")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    parser.add_argument("--num_problems", type=int, default=100)
    parser.add_argument("--problem_seed", type=int, default=4242)
    add_write_option(parser, "solve_probe")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="more train.py arguments")
    options = parser.parse_args()
    report = Report(__doc__, f"problems {options.problem_seed}; training: the config's seed_everything")
    export = options.export or train_sft(options.sft_steps, options.root, options.config, options.train_args)
    result = solve_rate(export, options.num_problems, options.problem_seed)
    report.say(f"export: {export}")
    report.say(f"example completion of problem 0:\n\n```\n{result.pop('example')}\n```")
    report.table(["measure", "share of the problems"], [[name, value] for name, value in result.items()])
    report.finish(result, options.write)


if __name__ == "__main__":
    main()
