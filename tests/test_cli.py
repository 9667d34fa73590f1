"""The console script, run as a user would, with the example configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("xr-datamodule")


SYNTHETIC = str(ROOT / "examples" / "synthetic.yaml")
GLOBAL = str(ROOT / "examples" / "global.yaml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a run writes (logs, checkpoints) stays out of the clone


def run(*args: str, **environment: str) -> subprocess.CompletedProcess:
    """The console script in the current directory (a test's temporary one)."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "xr_datamodule.cli"]
    env = {**os.environ, **environment}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture
def in_process(monkeypatch, capsys):
    """The console script's ``main`` in this process (no interpreter start): (status, out, err).

    For what needs no fresh process (help, errors): the loggers ``main`` quiets are restored.
    """
    import logging

    from xr_datamodule.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
        levels = [logger.level for logger in loggers]
        monkeypatch.setattr(sys, "argv", ["xr-datamodule", *args])
        try:
            main()
            status = 0
        except SystemExit as exit_:
            status = int(exit_.code or 0)
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
        out, err = capsys.readouterr()
        return status, out, err

    return call


def test_fit_synthetic_config_fast_dev_run_on_a_quiet_console():
    result = run("fit", "--config", SYNTHETIC, "--trainer.fast_dev_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stderr + result.stdout
    assert console.startswith("XarrayDataModule: synthetic://weather")  # ours first
    assert "climatology" in console  # the report
    # Neither Lightning's informational lines nor its LeafSpec deprecation (see quiet_console).
    for noise in ("GPU available", "Tip:", "Trainable params", "LeafSpec", "Warning"):
        assert noise not in console
    verbose = run(
        "fit", "--config", SYNTHETIC, "--trainer.fast_dev_run=true", XR_DATAMODULE_VERBOSE="1"
    )
    assert "fast_dev_run" in verbose.stderr + verbose.stdout  # Lightning's lines are back


def test_fit_netcdf_config_fast_dev_run(era_path):
    result = run(
        "fit",
        "--config",
        str(ROOT / "examples" / "netcdf.yaml"),
        "--data.data",
        str(era_path),
        "--trainer.fast_dev_run=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_cli_reports_bad_config_clearly():
    bad = ("fit", "--config", SYNTHETIC, "--data.input_vars=[t2m,nope]", "--trainer.fast_dev_run=1")
    result = run(*bad)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        "error: KeyError: input_vars: variable 'nope' is not in the data. "
        "Valid: ('t2m', 'u10', 'v10')"
    ]
    assert "Traceback" not in result.stderr


def test_the_whole_traceback_on_request(in_process, monkeypatch):
    bad = ("fit", "--config", SYNTHETIC, "--data.input_vars=[t2m,nope]", "--trainer.fast_dev_run=1")
    monkeypatch.setenv("XR_DATAMODULE_TRACEBACK", "1")
    # Not the one line: the exception itself, as jsonargparse raised it (chained to ours).
    with pytest.raises(ValueError, match="'nope' is not in the data") as raised:
        in_process(*bad)
    assert isinstance(raised.value.__cause__, KeyError)


def test_help_names_bench(in_process):
    status, out, _ = in_process("--help")
    assert status == 0
    assert "xr-datamodule bench --config CONFIG" in " ".join(out.split())


def test_bench_measures_and_recommends():
    result = run("bench", "--config", SYNTHETIC, "--batches", "5", "--workers", "0", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_workers=0, shuffle='full':" in result.stdout
    assert "num_workers=1, shuffle='full':" in result.stdout
    assert "samples/s" in result.stdout and "MB/s" in result.stdout
    assert "batch spread 1.0" in result.stdout or "batch spread 0.9" in result.stdout
    assert "recommendation: num_workers=" in result.stdout


def test_bench_compares_the_training_orders_out_of_core(tmp_path):
    config = yaml.safe_load((ROOT / "examples" / "synthetic.yaml").read_text())
    config["data"]["load"] = False
    path = tmp_path / "out_of_core.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run(
        "bench",
        "--config",
        str(path),
        "--batches",
        "3",
        "--workers",
        "0",
        "--shuffle",
        "chunks",
        "full",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shuffle='chunks'" in result.stdout and "shuffle='full'" in result.stdout


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands_exist(subcommand, in_process):
    status, out, err = in_process(subcommand, "--help")
    assert status == 0, err[-2000:]
    assert "--ckpt_path" in out


def test_the_main_job_leaves_a_checkpoint_metrics_and_predictions_on_the_grid(tmp_path):
    import xarray as xr

    from xr_datamodule import make_weather

    short = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=6")
    fitted = run("fit", "--config", SYNTHETIC, *short, "--trainer.enable_progress_bar=false")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    out = fitted.stdout
    assert "val: latitude-weighted RMSE per lead time" in out and "of the best checkpoint" in out
    assert "    persistence" in out and "    climatology" in out and "t2m (K)" in out
    best = Path(out.split("best checkpoint: ")[1].split()[0])
    assert best.exists() and best.name == "best.ckpt"
    metrics = Path(out.split("metrics: ")[1].split()[0])
    header = metrics.read_text().splitlines()[0].split(",")
    assert "val_loss" in header
    for who in ("model", "persistence", "climatology"):
        assert f"val_rmse_{who}/t2m/+1h" in header
    assert f"next: xr-datamodule predict --config {SYNTHETIC} --ckpt_path {best}" in out

    tested = run("test", "--config", SYNTHETIC, "--ckpt_path", str(best))
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "test: latitude-weighted RMSE per lead time" in tested.stdout
    assert "    persistence" in tested.stdout

    predicted = run("predict", "--config", SYNTHETIC, "--ckpt_path", str(best))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    # test and predict logged into the fit's run, which keeps its own metrics.
    runs = tmp_path / "lightning_logs" / "demo"
    assert [p.name for p in runs.glob("version_*")] == [best.parent.parent.name]
    assert "test_loss" in (best.parent.parent / "test" / "metrics.csv").read_text().splitlines()[0]
    assert (best.parent.parent / "predict" / "config.yaml").exists()
    assert "val_loss" in metrics.read_text().splitlines()[0]
    output = tmp_path / "lightning_logs" / "demo" / "predictions.nc"
    assert f"predictions: {output.relative_to(tmp_path)}" in predicted.stdout
    assert (tmp_path / "lightning_logs" / "demo" / "prediction.png").stat().st_size > 0
    source = make_weather()
    with xr.open_dataset(output) as grid:
        assert list(grid.data_vars) == ["t2m"]
        np.testing.assert_array_equal(grid.lat, source.lat)
        np.testing.assert_array_equal(grid.lon, source.lon)
        test_times = source.time.sel(time=slice("2019-03-26", "2019-03-31T23"))
        np.testing.assert_array_equal(grid.time, test_times)
        # The targets start 2 steps into the test split: what no window reaches is NaN.
        assert grid.t2m.isel(time=slice(0, 2)).isnull().all()
        assert grid.t2m.isel(time=slice(2, None)).notnull().all()


def test_the_global_example_trains_on_its_whole_input_list():
    result = run("fit", "--config", GLOBAL, "--trainer.fast_dev_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "X channels (21): t[level=500], t[level=850], u[level=500]" in result.stdout
    assert "lsm, orography, cos_latitude" in result.stdout
    assert "sin_local_time, insolation" in result.stdout
    assert "y channels (11):" in result.stdout and ", tp" in result.stdout
