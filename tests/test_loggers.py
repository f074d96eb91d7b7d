"""Loggers chosen by config, written offline and read back with each tool's own reader."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import needs_fixtures, tiny_config

from blurbtune.config import compose
from blurbtune.run import run

pytestmark = [needs_fixtures, pytest.mark.slow]


def test_logger_group_composes_one_or_several() -> None:
    assert list(compose(["model=tiny"]).logger) == ["csv"]
    assert list(compose(["model=tiny", "logger=[csv,tensorboard,mlflow,wandb]"]).logger) == \
        ["csv", "tensorboard", "mlflow", "wandb"]


def test_the_logger_choice_is_not_part_of_the_run_folder() -> None:
    cfg = compose(["model=tiny", "logger=tensorboard"])
    assert "logger" in cfg.hydra.job.config.override_dirname.exclude_keys


@pytest.fixture(scope="module", params=["single runs", "a stack"])
def sweep(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict:
    """Two seeds of one sweep, logged to all four loggers at once (W&B offline): two single
    runs, or one stack of both, whose members each log as their single run does."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("loggers")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = {}
    common = ("trainer.max_epochs=2", "name=my_sweep", "logger=[csv,tensorboard,mlflow,wandb]",
              f"logger.mlflow.tracking_uri={uri}")
    try:
        if request.param == "a stack":
            run(tiny_config(root / "my_sweep", root / "cache", "stack=[0,1]", *common))
        for seed in (0, 1):
            folder = root / "my_sweep" / f"seed={seed}"
            if request.param == "single runs":
                run(tiny_config(folder, root / "cache", f"seed={seed}", *common))
            runs[seed] = {"dir": folder,
                          "results": json.loads((folder / "results.json").read_text())}
    finally:
        mp.undo()
    return {"uri": uri, "runs": runs}


def test_csv_keeps_metrics_csv(sweep: dict) -> None:
    for r in sweep["runs"].values():
        rows = list(csv.DictReader((r["dir"] / "metrics.csv").open()))
        dev = [float(row["dev/pearson"]) for row in rows if row.get("dev/pearson")]
        assert dev == pytest.approx([h["dev"] for h in r["results"]["history"]])
        assert (r["dir"] / "hparams.yaml").is_file()


def test_tensorboard_event_files(sweep: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for seed, r in sweep["runs"].items():
        acc = EventAccumulator(str(r["dir"] / "tensorboard"))
        acc.Reload()
        dev = [e.value for e in acc.Scalars("dev/pearson")]
        assert dev == pytest.approx([h["dev"] for h in r["results"]["history"]], abs=1e-6)
        final = acc.Scalars("final/test_pearson_best")
        assert final[-1].value == pytest.approx(r["results"]["test"]["best"], abs=1e-6)
        content = acc.PluginTagToContent("hparams")
        data = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"])
        hparams = data.session_start_info.hparams
        assert hparams["seeds/seed"].number_value == seed
        assert hparams["task/name"].string_value == "biosses"


def test_mlflow_store(sweep: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep["uri"])
    experiment = client.get_experiment_by_name("my_sweep")  # the sweep's name
    found = client.search_runs([experiment.experiment_id])
    assert sorted(x.info.run_name for x in found) == ["seed=0", "seed=1"]  # the run folders
    for x in found:
        r = sweep["runs"][int(x.info.run_name[-1])]
        assert x.info.status == "FINISHED"
        assert x.data.params["seeds/seed"] == str(r["results"]["seed"])
        assert x.data.params["model/name"] == "tiny"
        history = client.get_metric_history(x.info.run_id, "dev/pearson")
        assert [m.value for m in history] == pytest.approx(
            [h["dev"] for h in r["results"]["history"]])
        assert x.data.metrics["final/test_pearson_best"] == pytest.approx(
            r["results"]["test"]["best"])


def _wandb_records(run_dir: Path) -> list[dict]:
    """The offline run's records, as W&B's own reader prints them."""
    [folder] = (run_dir / "wandb").glob("offline-run-*")
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run(sweep: dict) -> None:
    for seed, r in sweep["runs"].items():
        records = _wandb_records(r["dir"])
        [header] = [x["run"] for x in records if x["type"] == "run"]
        assert header["display_name"] == f"seed={seed}" and header["run_group"] == "my_sweep"
        config = {}
        for x in records:
            if x["type"] == "config":
                config.update(x["config"]["update"])
        assert config["seeds"]["seed"] == seed and config["task"]["name"] == "biosses"
        history = [x["history"]["item"] for x in records if x["type"] == "history"]
        dev = [h["dev/pearson"] for h in history if "dev/pearson" in h]
        assert dev == pytest.approx([h["dev"] for h in r["results"]["history"]])
        final = [h for h in history if "final/test_pearson_best" in h]
        assert final[-1]["final/test_pearson_best"] == pytest.approx(r["results"]["test"]["best"])
