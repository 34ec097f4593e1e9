"""The study's settings (`Setup`), its rows (`METHODS`, each in a sweep `FAMILIES` entry) and the
metrics its table reports (`METRICS`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

BASELINE = "dpo_nll"
BASE = "base"
METRICS = ("solve_rate", "maj_at_8", "pass_at_8", "processbench_f1", "within_response_auroc")
PAIRED_METRICS = ("solve_rate", "maj_at_8", "processbench_f1", "within_response_auroc")


@dataclass(frozen=True)
class Method:
    """One row of the study: how the preference stage trains from the base.

    Attributes:
        description: What it is, for the table.
        family: The sweep family whose learning rate (and NLL weight) it takes (`FAMILIES`).
        data: What it trains on: ``gold`` (the pool prompts' gold solutions), ``right`` (the
            base's right samples), ``pairs`` (the pool's pairs), ``step_dpo`` (the same pairs in
            Step-DPO's layout: prompt + shared correct prefix, then one step each) or ``online``
            (rounds of the policy's own samples).
        settings: `StepwiseDPOModule` loss settings on top of `Setup.model`.
    """

    description: str
    family: str
    data: str
    settings: dict = field(default_factory=dict)

    @property
    def sft_only(self) -> bool:
        return self.family == "sft"


PLAIN_DPO = {"outcome_loss_type": "sigmoid", "step_loss_weight": 0.0}
METHODS = {
    "sft_gold": Method("continued SFT on the gold solutions of the pool's prompts", "sft", "gold"),
    "rft": Method("RFT: SFT on the base's right samples (right answer, every step passed)", "sft", "right"),
    "dpo_nll": Method("plain DPO + NLL (Iterative RPO's loss): sigmoid outcome loss, step_loss_weight 0",
                      "preference", "pairs", PLAIN_DPO),
    "stepwise_nll": Method("stepwise default + NLL: reward_weighted step + soft_label outcome, 0.5 / 0.5",
                           "preference", "pairs"),
    "step_bce_nll": Method("step_bce step loss + soft_label outcome + NLL", "preference", "pairs",
                           {"step_loss_type": "step_bce"}),
    "step_dpo_nll": Method("Step-DPO on whole pairs: first_divergence step loss + soft_label outcome + NLL",
                           "preference", "pairs", {"step_loss_type": "first_divergence"}),
    "step_dpo_layout_nll": Method("Step-DPO's layout (step_dpo format: prompt + correct prefix, one step each), "
                                  "sigmoid DPO + NLL", "preference", "step_dpo", PLAIN_DPO),
    "online_nll": Method("online stepwise + NLL: rounds of the policy's own first-error pairs", "preference", "online"),
}
FAMILIES = {"sft": ("sft_gold", "rft"), "preference": ("dpo_nll", "stepwise_nll")}
"""Per family, the members its sweep trains; every method of the family takes the grid point with
the best mean validation solve rate over them."""


@dataclass(frozen=True)
class Setup:
    """What the study runs: the task, the base, the pool, the preference stage and the metrics.

    Attributes:
        max_value: Largest number of an embedded problem (`stepwise_lit.data.synthetic`; tiny.yaml:
            20): 3-digit running values, so the arithmetic has carries.
        max_operand: Largest operand of + and - (* takes 2 to 9).
        min_steps: Fewest steps of a problem.
        max_steps: Most steps of a problem.
        hidden_size: Width of the embedded Llama.
        num_layers: Its layers.
        num_heads: Its attention heads.
        base_steps: SFT steps of the base on gold solutions.
        base_batch_size: Gold solutions per base step.
        base_lr: Peak AdamW learning rate of the base, cosine-decayed to 0 over `base_steps`.
        curve_every: Steps between two points of the base's validation curve.
        pool_prompts: Training prompts the base samples for the pool (and the online rounds go through).
        samples: Samples per prompt (the pool's K, and maj@k's k).
        temperature: Sampling temperature of the pool, maj@k and the online rounds.
        val_problems: Held-out validation problems (sweep, curve, ProcessBench threshold).
        test_problems: Held-out test problems (every reported metric).
        labelled_samples: Base samples per held-out problem labelled for ProcessBench.
        steps: Optimizer steps of every method's stage.
        batch_size: Rows (pairs, or solutions for the SFT family) per step.
        max_new_tokens: Generation budget.
        max_length: Tokens of prompt + response.
        max_prompt_length: Prompt tokens (no prompt of the task is longer: none is cut).
        online_rounds: Rounds of ``online_nll`` (`steps / online_rounds` steps each).
        online_prompts: Prompts sampled per round.
        sweep_lrs: Learning rates of both sweeps.
        sweep_nll_weights: `sft_weight` values of the preference sweep.
        sampler: The backend that samples the pool and the online rounds (a ``generator`` setting:
            ``transformers``, ``vllm`` or an import path; the smoke test's solves half the samples).
        model: `StepwiseDPOModule` settings every method shares (tiny.yaml's loss settings).
    """

    max_value: int = 999
    max_operand: int = 9
    min_steps: int = 2
    max_steps: int = 6
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    base_steps: int = 2000
    base_batch_size: int = 32
    base_lr: float = 3e-3
    curve_every: int = 250
    pool_prompts: int = 2048
    samples: int = 8
    temperature: float = 1.0
    val_problems: int = 640
    test_problems: int = 640
    labelled_samples: int = 2
    steps: int = 100
    batch_size: int = 16
    max_new_tokens: int = 200
    max_length: int = 256
    max_prompt_length: int = 96
    online_rounds: int = 4
    online_prompts: int = 128
    sweep_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    sweep_nll_weights: tuple[float, ...] = (1.0, 3.0, 10.0)
    sampler: str = "transformers"
    model: dict = field(default_factory=lambda: {
        "step_beta": 0.1, "outcome_beta": 0.1, "outcome_loss_type": "soft_label", "step_loss_type": "reward_weighted",
        "step_reward_scale": 0.5, "aggregation_strategy": "mean", "step_loss_weight": 0.5, "outcome_loss_weight": 0.5,
    })

    def base_key(self) -> dict:
        """The settings the base and its pool depend on (the cache key)."""
        names = ("max_value", "max_operand", "min_steps", "max_steps", "hidden_size", "num_layers", "num_heads", "base_steps",
                 "base_batch_size", "base_lr", "curve_every", "pool_prompts", "samples", "temperature", "val_problems",
                 "test_problems", "labelled_samples", "max_new_tokens", "max_length", "max_prompt_length", "sampler")
        return {name: asdict(self)[name] for name in names}
