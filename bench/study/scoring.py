"""The study's measurements, with the package's parts: greedy solve rate, maj@k and pass@k of a policy
on held-out problems (`solve_rates`), and ProcessBench localisation by its implicit step rewards
(`localisation`)."""

from __future__ import annotations

from pathlib import Path

from bench.study.methods import Setup


def generator_of(module, datamodule, name: str = "transformers"):
    """The module's policy as a decoding backend (`name`: a ``generator`` setting, `Setup.sampler`),
    prompts tokenized as its training data's."""
    from stepwise_lit.models.generate import generator_class

    return generator_class(name, "--sampler")(module.policy, module.tokenizer, datamodule.settings.prompt_format,
                                               datamodule.hparams.max_prompt_length, progress=False)


def problems_of(rows: list[dict]) -> list:
    """Held-out problems of canonical rows: prompt, the gold solution's answer, the gold solution."""
    from stepwise_lit.data.heldout import Problem
    from stepwise_lit.grading.answers import extract_embedded

    return [Problem(row["prompt"], extract_embedded(row["reference_solution"]), row["reference_solution"]) for row in rows]


def sampling(setup: Setup, seed: int, num_samples: int | None = None):
    """`GenerationSettings` of the study's sampling: `setup.temperature`, ``num_samples`` (default
    `setup.samples`) per prompt, seeded."""
    from stepwise_lit.models.generate import GenerationSettings

    samples = num_samples or setup.samples
    return GenerationSettings(do_sample=True, temperature=setup.temperature, num_samples=samples, seed=seed,
                              max_new_tokens=setup.max_new_tokens, batch_size=max(1, 256 // samples))


def solve_rates(generator, problems: list, setup: Setup, seed: int | None) -> dict:
    """Greedy ``solve_rate`` on `problems` and ``no_answer_share`` (greedy completions that state no
    answer: cut by the budget, or stopped early); with a `seed` also ``maj_at_8`` and ``pass_at_8`` of
    `setup.samples` samples per problem (the key names k = 8, the default)."""
    import torch

    from stepwise_lit.evaluation.generation import GenerationMetrics, evaluate_problems
    from stepwise_lit.grading.answers import extract_embedded
    from stepwise_lit.models.generate import GenerationSettings

    weights = torch.ones(len(problems))
    greedy = GenerationMetrics("embedded", 1)
    completions = evaluate_problems(generator, problems, weights,
                                    GenerationSettings(max_new_tokens=setup.max_new_tokens, batch_size=160), greedy, None)
    values = {"solve_rate": greedy.compute(with_flags=False)["solve_rate"],
              "no_answer_share": sum(extract_embedded(samples[0]) is None for samples in completions) / len(problems)}
    if seed is not None:
        sampled = GenerationMetrics("embedded", setup.samples)
        evaluate_problems(generator, problems, weights, sampling(setup, seed), sampled, None)
        computed = sampled.compute(with_flags=False)
        values.update(maj_at_8=computed["maj_at_k"], pass_at_8=computed["pass_at_k"])
    return values


def localisation(policy: Path, reference: Path, val: list[dict], test: list[dict], beta: float) -> dict:
    """ProcessBench of the implicit step rewards h_t = β (log π - log π_ref) of the `policy` export
    against the `reference` export on labelled responses: the threshold with the best F1 on `val`,
    carried to `test` (``processbench_f1``, ``error_acc``, ``correct_acc``, ``within_response_auroc``)."""
    from stepwise_lit.evaluation.localisation import localisation_values, padded, score_responses
    from stepwise_lit.evaluation.processbench import choose_threshold
    from stepwise_lit.rewards.implicit import ImplicitStepScorer

    import torch

    scorer = ImplicitStepScorer(str(policy), str(reference), step_beta=beta, batch_size=64, progress=False)
    val_scores = score_responses(scorer, val, batch_size=256)
    rewards, mask = padded(val_scores)
    threshold = choose_threshold(rewards, mask, torch.tensor([row["first_error"] for row in val]))
    values = localisation_values(test, score_responses(scorer, test, batch_size=256), threshold)
    return {**{key: values[key] for key in ("processbench_f1", "error_acc", "correct_acc", "within_response_auroc")},
            "threshold": threshold}
