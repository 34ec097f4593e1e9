"""The study's rows and tasks: how each method's preference stage trains (`METHODS`), and each
task's data and step budget (`TASKS`); the metrics the table reports (`METRICS`)."""

from __future__ import annotations

from dataclasses import dataclass, field

BASELINE = "plain_dpo"
SFT_START = "sft_start"
METRICS = ("solve_rate", "processbench_f1", "error_acc", "correct_acc", "processbench_f1_per_token",
           "within_response_auroc", "reward_accuracy")
PAIRED_METRICS = ("solve_rate", "processbench_f1", "processbench_f1_per_token", "within_response_auroc", "reward_accuracy")


@dataclass(frozen=True)
class Method:
    """One row of the study: how the preference stage trains.

    Attributes:
        description: What it is, for the table.
        settings: `StepwiseDPOModule` arguments on top of `Task.model` (the loss settings).
        sft_only: Continue SFT for the stage instead (no preference loss).
        lr: Learning rate of the stage; None: the task's `preference_lr`.
        online: Train on pairs of the policy's own samples, in rounds (`OnlineRounds` with the
            task's `online_rounds`), instead of the fixed preference pairs: the `PairSettings`
            arguments of its pairs ({}: the defaults); None: offline.
        tasks: The tasks it runs on; None: every task.
    """

    description: str
    settings: dict = field(default_factory=dict)
    sft_only: bool = False
    lr: float | None = None
    online: dict | None = None
    tasks: tuple[str, ...] | None = None

    def runs_on(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


REFERENCE_PAIRS = {"correctness": "answer_and_steps", "reference_fallback": True}
"""`PairSettings` of the online methods whose right side passes every step, or is the reference."""

METHODS = {
    "sft": Method("SFT continued (no preference loss)", sft_only=True),
    "plain_dpo": Method("plain DPO: sigmoid outcome loss, step_loss_weight 0",
                        {"outcome_loss_type": "sigmoid", "step_loss_weight": 0.0}),
    "stepwise": Method("stepwise default: reward_weighted step + soft_label outcome, 0.5 / 0.5"),
    "step_bce": Method("step_bce step loss + soft_label outcome", {"step_loss_type": "step_bce"}),
    "step_dpo": Method("Step-DPO: first_divergence step loss + soft_label outcome",
                       {"step_loss_type": "first_divergence"}),
    # The policy's own samples, paired at the first wrong step; arithmetic only: the GSM8K SFT
    # policy solves no problem, so no sample is right and no pair can be built.
    "online": Method("online stepwise: first-error pairs of the policy's samples (right = right answer)",
                     online={}, tasks=("arithmetic",)),
    "online_reference": Method(
        "online stepwise: right = right answer and no flagged step; the reference where no sample is right",
        online=REFERENCE_PAIRS, tasks=("arithmetic",)),
    # Hypotheses for the SFT > DPO gap (`HYPOTHESES`, run by --hypotheses; the others by --methods)
    "stepwise_lr1e-3": Method("stepwise, preference lr 1e-3 (default 3e-4)", lr=1e-3),
    "stepwise_lr1e-4": Method("stepwise, preference lr 1e-4", lr=1e-4),
    "stepwise_lr3e-5": Method("stepwise, preference lr 3e-5", lr=3e-5),
    "online_reference_lr3e-5": Method("online_reference at lr 3e-5 (configs/online_tiny.yaml's rate for its rounds)",
                                      online=REFERENCE_PAIRS, tasks=("arithmetic",), lr=3e-5),
    "stepwise_sft3": Method("stepwise, sft_weight 3 (default 1)", {"sft_weight": 3.0}),
    "stepwise_sft10": Method("stepwise, sft_weight 10 (default 1)", {"sft_weight": 10.0}),
    "plain_dpo_sft10": Method("plain DPO, sft_weight 10",
                              {"outcome_loss_type": "sigmoid", "step_loss_weight": 0.0, "sft_weight": 10.0}),
    "stepwise_beta0.01": Method("stepwise, β_s = β_o = 0.01 (default 0.1)", {"step_beta": 0.01, "outcome_beta": 0.01}),
    "stepwise_beta0.5": Method("stepwise, β_s = 0.5", {"step_beta": 0.5}),
    "stepwise_step0.1": Method("stepwise, step_loss_weight 0.1 (default 0.5)", {"step_loss_weight": 0.1}),
    "stepwise_step1": Method("stepwise, step_loss_weight 1, outcome 0", {"step_loss_weight": 1.0, "outcome_loss_weight": 0.0}),
    # Length-normalised step rewards h_t / n_t in the step loss; β_s 2 keeps their size near h_t's
    # at β_s 0.1 (arithmetic steps: 24 tokens on average)
    "stepwise_per_token": Method("stepwise, step loss on h_t / n_t, β_s 2",
                                 {"step_reward_per_token": True, "step_beta": 2.0}),
    "step_bce_per_token": Method("step_bce on h_t / n_t, β_s 2",
                                 {"step_loss_type": "step_bce", "step_reward_per_token": True, "step_beta": 2.0}),
}
MAIN_METHODS = ("sft", "plain_dpo", "stepwise", "step_bce", "step_dpo", "online", "online_reference")
HYPOTHESES = ("sft", "plain_dpo", "stepwise", "plain_dpo_sft10", "stepwise_sft10", "stepwise_per_token", "step_bce_per_token",
              "stepwise_lr3e-5", "online_reference_lr3e-5")


@dataclass(frozen=True)
class Task:
    """A data set with its training budget.

    Attributes:
        name: ``arithmetic`` or ``gsm8k``.
        source: Answer extraction of the solve rate (`stepwise_lit.grading.answers`).
        batch_size: Pairs per optimizer step of the SFT warm-up.
        sft_steps: Optimizer steps of the SFT warm-up.
        preference_steps: Optimizer steps of each method's stage.
        preference_batch_size: Pairs per optimizer step of each method's stage.
        sft_lr: AdamW learning rate of the warm-up.
        preference_lr: AdamW learning rate of the stage (a tenth of SFT's, as tiny.yaml).
        max_length: Tokens (bytes) of prompt + response.
        max_prompt_length: Prompt tokens, cut from the left.
        max_new_tokens: Generation budget per test prompt.
        max_prompts: Test prompts decoded for the solve rate.
        hidden_size: Width of the embedded model (2 layers, 4 heads).
        online_rounds: Rounds of an online method: `preference_steps / online_rounds` steps each,
            on pairs from `online_prompts` prompts × 8 samples (temperature 0.7) per round.
        online_prompts: Prompts sampled per round, in order through the preference pairs' prompts.
        model: Module settings every method shares (tiny.yaml's model settings).
    """

    name: str
    source: str
    batch_size: int
    sft_steps: int
    preference_steps: int
    preference_batch_size: int
    sft_lr: float
    preference_lr: float
    max_length: int
    max_prompt_length: int
    max_new_tokens: int
    max_prompts: int
    hidden_size: int = 64
    online_rounds: int = 10
    online_prompts: int = 64
    model: dict = field(default_factory=lambda: {
        "step_beta": 0.1, "outcome_beta": 0.1, "outcome_loss_type": "soft_label", "step_loss_type": "reward_weighted",
        "step_reward_scale": 0.5, "aggregation_strategy": "mean", "step_loss_weight": 0.5, "outcome_loss_weight": 0.5,
        "sft_weight": 1.0,
    })


TASKS = {
    "arithmetic": Task("arithmetic", "embedded", batch_size=32, sft_steps=400, preference_steps=100,
                       preference_batch_size=16, sft_lr=3e-3,
                       preference_lr=3e-4, max_length=256, max_prompt_length=64, max_new_tokens=192, max_prompts=256),
    "gsm8k": Task("gsm8k", "gsm8k", batch_size=8, sft_steps=60, preference_steps=60, preference_batch_size=8, sft_lr=1e-3,
                  preference_lr=1e-4, max_length=384, max_prompt_length=192, max_new_tokens=128, max_prompts=64),
}

