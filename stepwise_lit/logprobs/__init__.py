"""Per-step log-probabilities of the policy and the reference, in one forward pass per model."""
