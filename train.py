"""Entry point: `python train.py fit --config configs/tiny.yaml`, the `stepwise-lit` command line
(`stepwise_lit.cli.main`): `python train.py <command>` is `stepwise-lit <command>`."""

from stepwise_lit.cli import main

if __name__ == "__main__":
    main()
