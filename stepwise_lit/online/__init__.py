"""Online stepwise DPO: sample solutions from the policy, score every step, build pairs, write each round to disk.

- :mod:`stepwise_lit.online.pairs`: scored solutions -> canonical training pairs by a named strategy;
- :mod:`stepwise_lit.online.rounds`: one round's solutions and pairs as JSON Lines in the run folder, and resuming;
- :mod:`stepwise_lit.online.solutions`: one round's generation, step scoring and pairing (``generate_round``).
"""
