"""stepwise_lit: stepwise DPO for PyTorch Lightning."""

__version__ = "0.1.0"
