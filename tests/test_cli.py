"""The console script, run as a user would, with the example configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("xr-datamodule")


def run(*args: str) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "xr_datamodule.cli"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_fit_synthetic_config_fast_dev_run():
    result = run("fit", "--config", "examples/synthetic.yaml", "--trainer.fast_dev_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast_dev_run" in result.stderr + result.stdout


def test_fit_netcdf_config_fast_dev_run(era_path):
    result = run(
        "fit",
        "--config",
        "examples/netcdf.yaml",
        "--data.data",
        str(era_path),
        "--trainer.fast_dev_run=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_cli_reports_bad_config_clearly():
    result = run(
        "fit",
        "--config",
        "examples/synthetic.yaml",
        "--data.input_vars=[t2m,nope]",
        "--trainer.fast_dev_run=true",
    )
    assert result.returncode != 0
    assert "'nope' is not in the data" in result.stderr


def test_bench_measures_and_recommends():
    result = run(
        "bench", "--config", "examples/synthetic.yaml", "--batches", "5", "--workers", "0", "1"
    )
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
def test_other_subcommands_exist(subcommand):
    result = run(subcommand, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
