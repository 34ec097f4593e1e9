"""A hand ProcessBench table shared by the metric tests: step rewards, their mask, first-error labels."""

import torch

# ProcessBench table, threshold 0 (a step is flagged when its reward < 0); -9 is padding.
REWARDS = torch.tensor(
    [
        [0.5, -0.2, -0.4],  # label 1, predicted 1: hit
        [-0.1, 0.3, 0.2],  # label 2, predicted 0: miss
        [0.4, 0.6, -9.0],  # label 1, predicted -1: miss (the padding is not a step)
        [0.2, 0.1, 0.3],  # label -1, predicted -1: hit
        [0.3, -0.5, -9.0],  # label -1, predicted 1: miss
        [1.0, 2.0, 3.0],  # label -1, predicted -1: hit
    ]
)
MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
LABELS = torch.tensor([1, 2, 1, -1, -1, -1])
