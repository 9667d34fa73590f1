"""Train the demo from a config and compare its validation loss with trivial baselines.

    python examples/baselines.py examples/synthetic.yaml

Baselines on the validation split (mean squared error, same units as the target):
- climatology: predict the mean target of the training split everywhere;
- persistence: predict the last input time step of the target variable (when the target
  variable is an input and time is windowed).
"""

from __future__ import annotations

import sys

import torch
import yaml

from xr_datamodule import XarrayDataModule
from xr_datamodule.cli import run_cli


def baselines(dm: XarrayDataModule) -> dict[str, float]:
    """Validation MSE of the climatology and persistence baselines."""
    dm.setup("fit")
    train_mean = torch.cat([y for _, y in dm.train_dataloader()]).mean()
    results: dict[str, list[float]] = {"climatology": [], "persistence": []}
    target = dm.target_vars[0]
    persist = target in dm.input_vars and "time" in dm.window_dims and len(dm.target_vars) == 1
    time_axis = 2 + dm.window_dims.index("time") if persist else None
    channel = dm.input_vars.index(target) if persist else None
    weights = []
    for X, y in dm.val_dataloader():
        weights.append(len(y))
        results["climatology"].append(float(((y - train_mean) ** 2).mean()))
        if persist:
            last = X[:, channel : channel + 1].select(time_axis, -1).unsqueeze(time_axis)
            results["persistence"].append(float(((y - last) ** 2).mean()))
    total = sum(weights)
    return {
        name: sum(v * w for v, w in zip(values, weights, strict=True)) / total
        for name, values in results.items()
        if values
    }


def main(config: str) -> None:
    """Train from ``config`` and print the final val_loss beside the baselines."""
    with open(config) as file:
        data_args = yaml.safe_load(file)["data"]
    cli = run_cli(["fit", "--config", config, "--trainer.enable_progress_bar=false"])
    val_loss = float(cli.trainer.callback_metrics["val_loss"])
    print(f"demo model, final val_loss: {val_loss:.4f}")
    for name, value in baselines(XarrayDataModule(**data_args)).items():
        print(f"baseline {name:12s}: {value:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/synthetic.yaml")
