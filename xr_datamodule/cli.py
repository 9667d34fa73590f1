"""The ``xr-datamodule`` command: LightningCLI with ``fit``, ``validate``, ``test``, ``predict``.

Example (shell)::

    xr-datamodule fit --config examples/synthetic.yaml
    xr-datamodule fit --config examples/netcdf.yaml --data.data ../shared/data/eraint_uvz.nc

The model's ``input_shape`` and ``target_shape`` are linked from the datamodule once it is
built (``apply_on="instantiate"``), so a model given by ``class_path`` must accept both.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from xr_datamodule.datamodule import XarrayDataModule

__all__ = ["XarrayCLI", "main", "run_cli"]


def _input_shape(datamodule: XarrayDataModule) -> tuple[int, ...]:
    return datamodule.input_shape


def _target_shape(datamodule: XarrayDataModule) -> tuple[int, ...]:
    return datamodule.target_shape


class XarrayCLI(LightningCLI):
    """LightningCLI that links the datamodule's sample shapes into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``data`` → ``model.init_args.{input,target}_shape`` after instantiation."""
        for target, compute in (("input_shape", _input_shape), ("target_shape", _target_shape)):
            parser.link_arguments(
                "data", f"model.init_args.{target}", compute_fn=compute, apply_on="instantiate"
            )


def run_cli(args: Sequence[str] | None = None) -> XarrayCLI:
    """Run the command line and return the CLI object (``args`` replaces ``sys.argv[1:]``)."""
    return XarrayCLI(
        pl.LightningModule,
        XarrayDataModule,
        subclass_mode_model=True,
        args=list(args) if args is not None else None,
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    """Console-script entry point of ``xr-datamodule``."""
    run_cli()


if __name__ == "__main__":
    main()
