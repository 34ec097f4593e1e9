"""Study: does stepwise DPO make a better reasoner than plain DPO? (docs/results.md, "The study")

Run from the repository root:

    python -m bench.study --out runs/study_main --results docs/results/study         # < 30 min on 2 CPU cores
    python -m bench.study --tasks arithmetic --hypotheses --out runs/study_hyp \
        --results docs/results/study/hypotheses                                      # why SFT wins: `HYPOTHESES`
    python -m bench.study --smoke --out /tmp/smoke   # 1 seed, a few steps, 3 methods (the test)

The package: `methods` (the rows, `METHODS`, and the tasks, `TASKS`), `data` (the tasks' pair
files), `run` (one warm-up or method in a worker process), `statistics` (means, paired
differences, the sign test), `report` (the table, the plots, runs.json) and `__main__` (the command).

Every method starts from the same SFT policy of its seed and trains for the same number of
optimizer steps of the same batch size; the offline methods on the same pairs in the same order
(only the loss differs), the online ones (`Method.online`) on pairs of the policy's own samples:
`online_rounds` rounds of `online_prompts` training prompts × 8 samples (temperature 0.7), scored
by the rule verifier, paired at the first wrong step (`first_error_branch`), with the default
stepwise loss (arithmetic only: on GSM8K the SFT policy solves nothing, so no sample is right).

Tasks (`TASKS`):
- ``arithmetic``: the embedded task (`stepwise_lit.data.synthetic`) with numbers up to
  ``--max-value`` (tiny.yaml: 20, which has only ~330 distinct problems, so held-out
  problems there differ from training ones in names only). Validation and test problems
  are held out *by their arithmetic* (start value, operation, count): no test problem's
  solution appears in training. Errors sit at known steps (scores +1 before the slip, -1
  from it on).
- ``gsm8k``: ``../shared/data/gsm8k/example_model_solutions.jsonl`` through the ``gsm8k``
  adapter (ground truth chosen, the strongest model's incorrect solution rejected), the
  rejected steps scored by the rule verifier (`ArithmeticStepVerifier`), split by a hash
  of the question into train / validation / test.

Per task and seed: one SFT warm-up (the embedded tiny Llama from random weights, trained on
the chosen solutions of the SFT pairs, `sft_warmup_steps`), exported; then each method of
`--methods` (`METHODS`) loads that export as its policy and as its frozen reference (the SFT
policy, as tiny.yaml re-freezes it) and trains on the preference pairs. Each trained policy
is evaluated with the package's callbacks: `validate` on the validation pairs chooses the
ProcessBench threshold of the implicit step rewards h_t (and of their per-token form h_t/n_t),
`test` on the test pairs reports at that threshold, with the greedy solve rate of the test
prompts (`SolveRateEvaluation`), reward accuracy and within-response AUROC. The SFT policy
itself is tested once per seed (its solve rate: where every method starts).

Runs go to two worker processes (``--workers``, one torch thread each); a free worker takes the
methods of a finished warm-up first. Writes under ``--results`` (default: ``--out``): ``runs.json``
(every run's metrics, settings and thresholds), ``table.md`` and ``table.json`` (the command, mean ±
sample std over seeds; per method the paired comparison with plain DPO: mean and sample std of the
per-seed differences, sign count, exact two-sided sign-test p-value), ``solve_rate.png`` and
``f1.png``; under ``--out``: the data files, the tokenized cache, the SFT exports, each run's
reports and logs (an online run's rounds under ``runs/<task>-<method>-seed<seed>/online/``; their
pairs per round, right samples and seconds in the table). The tables and runs.json are written
after every finished run, the plots at the end. Prints the table and the wall time of the whole command.
"""

