"""Study v3: from one plateaued base, on a pool of its own samples, does a stepwise loss beat plain
DPO + NLL? (docs/study.md)

Run from the repository root:

    python -m bench.study --out runs/study --results docs/results/study   # <= 60 min on 2 CPU cores
    python -m bench.study --smoke --out /tmp/smoke --cache /tmp/smoke-cache \
        --sampler tests.helpers.study_helpers.HalfRightSampler           # the test's budget

What it does, in order:

1. **The base** (`base`), once per settings (cached under ``--cache`` as ``base-<hash of
   Setup.base_key()>``): the embedded tiny Llama from random weights, SFT on the gold solutions of
   embedded arithmetic problems with 3-digit numbers (`Setup`), the learning rate cosine-decayed to
   0; its greedy solve rate on the validation problems every `Setup.curve_every` steps is the curve.
   Validation and test problems are held out by their arithmetic (no held-out solution occurs in
   training).
2. **The pool**, in the same process: `Setup.samples` samples (temperature `Setup.temperature`) of
   the base for each of `Setup.pool_prompts` training prompts, every step scored by the rule
   verifier (`ArithmeticStepVerifier`, given the gold solution), graded. From it: the pairs (per
   prompt a right sample, right answer and every step passed, against the wrong one sharing the
   most leading steps, `first_error_branch`; else best against worst by the lowest step score,
   `best_vs_worst`), the same pairs in Step-DPO's layout (the package's ``step_dpo`` format), and
   RFT's right samples. Also the base's own samples of the held-out problems, labelled by the
   verifier, for ProcessBench.
3. **The sweeps** (`FAMILIES`, seed 0, validation): the SFT family (continued SFT, RFT) over the
   learning rates, the preference family (plain DPO + NLL, stepwise + NLL) over learning rate ×
   NLL weight (`sft_weight`); each family's point with the best mean validation solve rate is used
   by all its methods.
4. **The methods** (`METHODS`), each for every ``--seeds`` from the base, `Setup.steps` optimizer
   steps of `Setup.batch_size` rows: the seed sets batch order and sampling only (the base and the
   pool are the same for every seed). Measured on the test problems: greedy solve rate, maj@8 and
   pass@8 (`scoring.solve_rates`), and ProcessBench F1 and within-response AUROC of the implicit
   step rewards against the base on the base's labelled test samples, threshold chosen on the
   labelled validation samples (`scoring.localisation`).
5. **The report** (`report`, `statistics`): the curve and its last quarter, the pool, the sweeps,
   mean ± sample std per method, and per method minus plain DPO + NLL paired by seed: the
   differences, the sign count with an exact sign test, a 95% t-interval and a paired bootstrap
   interval; written to ``--results`` (``table.md``, ``table.json``, ``runs.json``, ``curve.png``,
   ``solve_rate.png``, ``paired.png``) after every run, the plots at the end. Each run's log and
   export stay under ``--out/runs/``.
"""
