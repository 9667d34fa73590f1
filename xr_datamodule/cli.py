"""The ``xr-datamodule`` command: LightningCLI with ``fit``, ``validate``, ``test``, ``predict``.

Example (shell)::

    xr-datamodule fit --config examples/synthetic.yaml
    xr-datamodule fit --config examples/netcdf.yaml
    xr-datamodule bench --config examples/synthetic.yaml --workers 0 2
    xr-datamodule stats --config examples/synthetic.yaml --output stats.json

The model's ``input_shape`` and ``target_shape`` are linked from the datamodule once it is
built (``apply_on="instantiate"``), so a model given by ``class_path`` must accept both.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from tqdm import tqdm

from xr_datamodule.datamodule import XarrayDataModule
from xr_datamodule.statcache import write_statistics

__all__ = ["XarrayCLI", "bench", "main", "run_cli"]


def _input_shape(datamodule: XarrayDataModule) -> tuple[int, ...]:
    return datamodule.input_shape


def _target_shape(datamodule: XarrayDataModule) -> tuple[int, ...]:
    return datamodule.target_shape


EPILOG = (
    "Also: xr-datamodule bench --config CONFIG [--workers 0 2] [--shuffle chunks full] times "
    "the configured training loader and recommends a setting (xr-datamodule bench --help); "
    "xr-datamodule stats --config CONFIG [--output statistics.json] computes the statistics "
    "once into the file data.stats takes (xr-datamodule stats --help). "
    "Errors in the configuration are shown in one line; XR_DATAMODULE_TRACEBACK=1 shows the "
    "whole traceback."
)
TRACEBACK_SWITCH = "XR_DATAMODULE_TRACEBACK"
VERBOSE_SWITCH = "XR_DATAMODULE_VERBOSE"  # 1: keep Lightning's informational lines
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class XarrayCLI(LightningCLI):
    """LightningCLI that links the datamodule's sample shapes into the model."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The main parser, whose help also names ``bench``."""
        kwargs.setdefault("epilog", EPILOG)
        return super().init_parser(**kwargs)

    def before_instantiate_classes(self) -> None:
        """``test``/``predict``/``validate`` of a fit's checkpoint log into that fit's run.

        With ``--ckpt_path <save_dir>/<name>/version_N/checkpoints/x.ckpt`` and a logger of
        that ``save_dir`` and ``name``, the logger writes into ``version_N/<subcommand>``
        (its config and metrics) rather than into a new ``version_N+1`` beside the fit's; a
        logger writing into ``version_N`` itself would delete the fit's ``metrics.csv``.
        """
        subcommand = self.subcommand
        if subcommand not in ("test", "predict", "validate"):
            return
        config = self.config[subcommand]
        run_dir = _run_dir_of(config.get("ckpt_path"))
        logger = config.trainer.get("logger")
        init = getattr(logger, "init_args", None) if logger is not None else None
        if run_dir is None or init is None or init.get("version") is not None:
            return
        save_dir, name = init.get("save_dir"), init.get("name")
        if save_dir is not None and Path(save_dir, name or "") == run_dir.parent:
            init["version"] = f"{run_dir.name}/{subcommand}"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``data`` → ``model.init_args.{input,target}_shape`` after instantiation."""
        for target, compute in (("input_shape", _input_shape), ("target_shape", _target_shape)):
            parser.link_arguments(
                "data", f"model.init_args.{target}", compute_fn=compute, apply_on="instantiate"
            )


def _run_dir_of(ckpt_path: Any) -> Path | None:
    """The run folder of ``.../version_N/checkpoints/x.ckpt`` (a fit's), or None."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path))
    if path.parent.name != "checkpoints" or not path.parent.parent.name.startswith("version_"):
        return None
    return path.parent.parent


def run_cli(args: Sequence[str] | None = None) -> XarrayCLI:
    """Run the command line and return the CLI object (``args`` replaces ``sys.argv[1:]``)."""
    return XarrayCLI(
        pl.LightningModule,
        XarrayDataModule,
        subclass_mode_model=True,
        args=list(args) if args is not None else None,
        save_config_kwargs={"overwrite": True},
    )


def _data_arguments(config: str) -> dict[str, Any]:
    with open(config) as file:
        data = (yaml.safe_load(file) or {}).get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{config}: no 'data' section to build the datamodule from")
    return dict(data.get("init_args", data))


def bench(args: Sequence[str] | None = None) -> dict[tuple[int, str], float]:
    """``xr-datamodule bench``: time the configured training loader as a user would run it.

    For each ``--workers`` value (and each ``--shuffle`` order, if given), builds the
    datamodule from the config's ``data`` section, times the first batch (from
    construction) and then ``--batches`` batches, with a progress bar, and prints
    samples/s, MB/s and the batch spread (how varied batches are along the split dim, 1.0
    for a full shuffle; see ``XarrayDataModule.batch_spread``); it ends with the setting to
    use and why.

    Returns:
        Delivered MB/s per (number of workers, training order).
    """
    parser = argparse.ArgumentParser(prog="xr-datamodule bench", description=bench.__doc__)
    parser.add_argument("--config", required=True, help="a YAML config with a 'data' section")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--shuffle",
        nargs="+",
        default=None,
        choices=["auto", "chunks", "full"],
        help="training orders to compare (default: the config's)",
    )
    parser.add_argument("--batches", type=int, default=200, help="batches timed per setting")
    options = parser.parse_args(args)
    data_args = _data_arguments(options.config)
    rates: dict[tuple[int, str], float] = {}
    for shuffle in options.shuffle or [data_args.get("shuffle", "auto")]:
        for workers in options.workers:
            began = time.perf_counter()
            dm = XarrayDataModule(**{**data_args, "num_workers": workers, "shuffle": shuffle})
            dm.setup("fit")
            batches = iter(dm.train_dataloader())
            first_batch = next(batches)
            first = time.perf_counter() - began
            nbytes = samples = 0
            timed = time.perf_counter()
            total = min(options.batches, len(dm.train_dataloader()) - 1)
            for inputs, targets in tqdm(
                islice(batches, total), total=total, desc=f"num_workers={workers}", leave=False
            ):
                nbytes += inputs.nbytes + targets.nbytes
                samples += len(inputs)
            seconds = max(time.perf_counter() - timed, 1e-9)
            key = (workers, dm.train_shuffle)
            rates[key] = nbytes / seconds / 1e6
            mode = "in memory" if dm.loads_into_memory else "out of core"
            print(
                f"num_workers={workers}, shuffle={dm.train_shuffle!r}: "
                f"{samples / seconds:,.0f} samples/s, {rates[key]:,.1f} MB/s, first batch "
                f"after {first:.2f} s, batch spread {dm.batch_spread():.2f} ({mode}, batch "
                f"{tuple(first_batch[0].shape)})"
            )
    (workers, shuffle) = best = max(rates, key=rates.__getitem__)
    others = [rate for key, rate in rates.items() if key != best]
    reason = (
        f"it delivered {rates[best]:,.1f} MB/s, {rates[best] / max(others):.1f}x the "
        "next best setting"
        if others
        else "it is the only setting measured"
    )
    print(
        f"recommendation: num_workers={workers}, shuffle={shuffle!r}, because {reason}; with "
        f"the data {'in memory' if dm.loads_into_memory else 'read out of core'}, as load="
        f"{data_args.get('load', 'auto')!r} decides. The batch spread says what the order "
        "gives up for its speed."
    )
    return rates


def stats(args: Sequence[str] | None = None) -> Path:
    """``xr-datamodule stats``: compute the training split's statistics once, into a file.

    Builds the datamodule from the config's ``data`` section (``normalize="zscore"`` if it
    has none), computes the statistics of its training split on the dask scheduler in
    effect (``--scheduler`` connects to a ``distributed`` cluster first), with a progress bar
    in a terminal, and writes the JSON file that ``data.stats`` takes. They are also left in
    the statistics cache (unless the config turns it off), so the next ``fit`` finds them.

    Returns:
        The file written.
    """
    parser = argparse.ArgumentParser(prog="xr-datamodule stats", description=stats.__doc__)
    parser.add_argument("--config", required=True, help="a YAML config with a 'data' section")
    parser.add_argument("--output", default="statistics.json", help="the JSON file to write")
    parser.add_argument(
        "--scheduler", default=None, help="a dask distributed scheduler's address to compute on"
    )
    options = parser.parse_args(args)
    data_args = _data_arguments(options.config)
    data_args.setdefault("normalize", "zscore")
    data_args["normalize"] = data_args["normalize"] or "zscore"
    data_args.pop("stats", None)  # computed here, not read
    client = None
    if options.scheduler:
        from distributed import Client

        client = Client(options.scheduler)
    try:
        began = time.perf_counter()
        dm = XarrayDataModule(**data_args)
        path = write_statistics(dm, options.output)
    finally:
        if client is not None:
            client.close()
    print(
        f"statistics of {len(dm.statistics.mean)} variables ({dm.pipeline.statistics_origin}) "
        f"in {time.perf_counter() - began:.1f} s: {path}\n"
        f"use them with: data.stats: {path}  (or stats={str(path)!r} in Python)"
    )
    return path


def our_error(error: BaseException) -> BaseException | None:
    """The error this package raised about the configuration, if ``error`` comes from one.

    LightningCLI and jsonargparse wrap what the datamodule raises (e.g. in a link's
    ``compute_fn``) in their own errors; the first error of the chain that was raised
    inside this package with a documented type is the one a user can act on.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback = current.__traceback__
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        raised_here = traceback is not None and traceback.tb_frame.f_code.co_filename.startswith(
            _PACKAGE
        )
        if raised_here and isinstance(current, (ValueError, KeyError, TypeError, OSError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def _message(error: BaseException) -> str:
    # A KeyError's str() is the repr of its message.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{type(error).__name__}: {text}"


def quiet_console() -> None:
    """What the command prints: our lines, Lightning's progress bars, warnings and errors.

    Lightning's informational lines (the seed, the devices found, a tip for its cloud
    logger, the model summary) are left out unless ``XR_DATAMODULE_VERBOSE=1``. Lightning
    2.x's batch-size helper uses torch's ``LeafSpec``, which torch >= 2.10 deprecates: the
    warning came at every fit, is harmless and is not ours to fix (the command owns its
    console; a notebook or script still sees it).
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    if os.environ.get(VERBOSE_SWITCH, "") in ("", "0"):
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    """Console-script entry point of ``xr-datamodule``.

    A configuration error raised by this package ends the command with its one-line
    message (exit status 2), as LightningCLI's own argument errors do; set
    ``XR_DATAMODULE_TRACEBACK=1`` for the whole traceback.
    """
    quiet_console()
    try:
        if sys.argv[1:2] == ["bench"]:
            bench(sys.argv[2:])
        elif sys.argv[1:2] == ["stats"]:
            stats(sys.argv[2:])
        else:
            run_cli()
    except Exception as error:
        found = our_error(error)
        if found is None or os.environ.get(TRACEBACK_SWITCH, "") not in ("", "0"):
            raise
        print(f"error: {_message(found)}", file=sys.stderr)
        print(f"(the whole traceback: {TRACEBACK_SWITCH}=1 xr-datamodule ...)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
