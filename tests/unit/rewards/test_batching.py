"""`padded_batches`: the scorers' batching of token id lists (longest first, padded, indices kept)."""

import torch

from stepwise_lit.rewards.batching import padded_batches


def test_batches_are_longest_first_padded_and_point_back_to_their_sequences():
    """Lengths (1, 3, 2) in batches of 2: sequences 1 and 2 first (right padded with 0 to 3), then 0."""
    model = torch.nn.Linear(1, 1)
    sequences = [[7], [4, 5, 6], [8, 9]]
    batches = list(padded_batches(model, sequences, batch_size=2, pad_id=0, side="right"))
    assert [indices for indices, _ in batches] == [[1, 2], [0]]
    first = batches[0][1]
    assert first["input_ids"].tolist() == [[4, 5, 6], [8, 9, 0]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    ((_, left),) = list(padded_batches(model, sequences[1:], 2, pad_id=0, side="left"))
    assert left["input_ids"].tolist() == [[4, 5, 6], [0, 8, 9]] and left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
