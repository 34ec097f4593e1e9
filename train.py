"""Entry point: `python train.py fit --config configs/tiny.yaml`."""

from stepwise_lit.cli import main

if __name__ == "__main__":
    main()
