import json
import os
import re
import signal
import subprocess
from dataclasses import fields, replace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from data_prep.datasets import CAMVID
from pipelines.cli import main
from pipelines.config import TrainConfig, TuneConfig, trial_defaults
from pipelines.core.plots import legend
from pipelines.search.tune import tune_search
from pipelines.tracking import registry
from segnet import SegNetError
from tests.helpers import (
    complete_checkpoints,
    error_line,
    flip_a_byte,
    mlflow_store,
    start_segnet,
    wait_until,
)

pytestmark = pytest.mark.slow
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


@pytest.fixture(scope="module")
def shards(shards_12):
    """The session's 12-image shards (tests/conftest.py), read-only."""
    return shards_12


def _cfg(shards, tmp, **kw) -> TuneConfig:
    """A small search; keywords of TrainConfig go to the trials' settings, the others to the search's."""
    train = dict(
        data=str(shards),
        epochs=1,
        image_size="64x96",
        batch_size=4,
        workers=1,
        loader_workers=0,
        storage_path=str(tmp / "runs"),
        mlflow_uri=mlflow_store(tmp / "mlruns.db"),
    )
    search = dict(num_samples=2, max_concurrent=2)
    for k, v in kw.items():
        (train if k in TRAIN_FIELDS and k != "class_weighting" else search)[k] = v
    return TuneConfig(train=replace(trial_defaults(), **train), **search)


@pytest.fixture(scope="module")
def search(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    cfg = _cfg(shards, tmp, name="s1")
    return cfg, tune_search(cfg)


def test_search_registers_the_best_trial_as_champion(search):
    cfg, summary = search
    assert len(summary["trials"]) == 2
    assert summary["registered"]["champion"] is True
    shown = registry.show(cfg.train.mlflow_uri, "segnet-camvid@champion")
    assert shown["version"] == summary["registered"]["version"] and "champion" in shown["aliases"]
    assert shown["metrics"]["test_miou"] == pytest.approx(summary["test"]["miou"])
    assert all(key.startswith("test_") for key in shown["metrics"]), shown["metrics"]  # not an epoch's
    assert shown["data_manifest_sha256"]


def _search_runs(cfg) -> tuple:
    """(client, the search's parent run, its trials' runs)."""
    c = MlflowClient(tracking_uri=cfg.train.mlflow_uri)
    found = c.search_runs([c.get_experiment_by_name("segnet-camvid").experiment_id])  # named after the data
    (parent,) = [r for r in found if r.info.run_name == cfg.train.name]
    return c, parent, [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_trials_are_mlflow_runs_nested_under_the_search(search):
    cfg, _ = search
    _, parent, children = _search_runs(cfg)
    assert len(children) == 2
    assert {"search_space", "scheduler", "best_trial"} <= set(parent.data.tags)
    assert "best_test_miou" in parent.data.metrics


def test_every_trial_run_holds_its_plots_and_ends_though_tune_stopped_it(search):
    """ASHA stops each trial at its last report (max_t), before the trial records its end: the search
    records it from the trial's folder (`close_run`), plots drawn from its newest checkpoint."""
    cfg, _ = search
    c, _, trials = _search_runs(cfg)
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED", run.info.run_name
        files = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
        assert {f"plots/{f}" for f in ("confusion_matrix_val.png", "training_curves.png")} <= files, files
        assert {f"plots/overlay_val_{i}.png" for i in range(3)} <= files, files
        assert "best_val_miou" in run.data.metrics and "best_checkpoint" in run.data.tags


def test_the_search_run_shows_the_registered_version_and_its_logged_model(search):
    """The MLflow UI lists a run's logged models from its outputs, and their registered versions from the
    LoggedModel's mlflow.modelVersions tag: both for the search's run, the version's own run a trial."""
    cfg, summary = search
    c, parent, trials = _search_runs(cfg)
    reg = summary["registered"]
    version = c.get_model_version(reg["name"], reg["version"])
    assert reg["model_id"] in [m.model_id for m in parent.outputs.model_outputs]
    model = c.get_logged_model(reg["model_id"])
    linked = json.loads(model.tags["mlflow.modelVersions"])
    assert {"name": reg["name"], "version": int(reg["version"])} in linked
    assert version.run_id in [t.info.run_id for t in trials]
    assert version.source == f"models:/{reg['model_id']}"


def test_the_registered_version_describes_model_data_size_scores_and_search(search):
    cfg, summary = search
    c, parent, _ = _search_runs(cfg)
    reg = summary["registered"]
    text = c.get_model_version(reg["name"], reg["version"]).description
    sha = registry.show(cfg.train.mlflow_uri, f"{reg['name']}/{reg['version']}")["data_manifest_sha256"]
    assert "segnet-basic" in text and "camvid" in text and sha in text and "64x96" in text, text
    test = summary["test"]
    for short, key in (("G", "global_accuracy"), ("C", "class_accuracy"), ("mIoU", "miou"), ("BF", "bf")):
        assert f"{short} {test[key]:.4f}" in text, text
    assert f"[{cfg.train.name}](#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id})" in text


def test_champion_predicts_in_a_new_process(search, camvid_dir, tmp_path, segnet_cli):
    cfg, _ = search
    image = sorted((camvid_dir / "test").iterdir())[0]
    small = tmp_path / "in" / "small.png"
    small.parent.mkdir()
    Image.open(image).resize((150, 100)).save(small)  # another size than the model's
    (tmp_path / "in" / image.name).write_bytes(image.read_bytes())
    r = segnet_cli(
        "predict",
        "--model",
        "models:/segnet-camvid@champion",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--overlay",
        "--mlflow-uri",
        cfg.train.mlflow_uri,
    )
    assert r.returncode == 0, r.stderr
    label = np.asarray(Image.open(tmp_path / "out" / image.name))
    assert label.shape == (360, 480) and label.max() <= 10
    assert np.asarray(Image.open(tmp_path / "out" / "small.png")).shape == (100, 150)
    overlay = np.asarray(Image.open(tmp_path / "out" / "small_overlay.png").convert("RGB"))
    strip = legend(150, CAMVID)  # CamVid's class names beside their colours, under the image
    assert overlay.shape == (100 + strip.shape[0], 150, 3) and np.array_equal(overlay[100:], strip)


def test_evaluate_model_uri_reproduces_the_registered_test_scores(search, shards, tmp_path, segnet_cli):
    cfg, summary = search
    args = ["evaluate", "--model-uri", "models:/segnet-camvid@champion", "--data", str(shards), "--split"]
    r = segnet_cli(*args, "test", "--out", str(tmp_path), "--json", "--mlflow-uri", cfg.train.mlflow_uri)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["miou"] == pytest.approx(summary["test"]["miou"], abs=1e-6)
    assert (tmp_path / "confusion_matrix_test.png").exists()


def test_alias_does_not_move_to_a_model_that_is_not_better(search):
    cfg, summary = search
    best = summary["best"]["checkpoint"]
    meta_run = registry.show(cfg.train.mlflow_uri, "segnet-camvid@champion")["run_id"]
    said = []
    same = registry.register(
        cfg.train.mlflow_uri, "segnet-camvid", best, summary["test"], "x", meta_run, log=said.append
    )
    assert same["champion"] is False and "stays on" in said[0]
    assert (
        registry.show(cfg.train.mlflow_uri, "segnet-camvid@champion")["version"]
        == summary["registered"]["version"]
    )
    forced = registry.register(
        cfg.train.mlflow_uri, "segnet-camvid", best, summary["test"], "x", meta_run, force_alias=True
    )
    assert forced["champion"] is True
    assert registry.show(cfg.train.mlflow_uri, "segnet-camvid@champion")["version"] == forced["version"]


def test_promote_rolls_champion_back_and_refuses_unknown_or_incomplete_versions(search, capsys):
    """After a --force-alias registration took `champion`, `segnet registry promote NAME VERSION` moves it
    back, says so and records it on the version; an unknown or incomplete version is one line, exit 2."""
    cfg, summary = search
    uri, name = cfg.train.mlflow_uri, summary["registered"]["name"]
    back = registry.show(uri, f"{name}@champion")["version"]
    run = registry.show(uri, f"{name}/{back}")["run_id"]
    forced = registry.register(
        uri, name, summary["best"]["checkpoint"], summary["test"], "x", run, force_alias=True, log=print
    )
    capsys.readouterr()
    assert main(["registry", "promote", name, back, "--mlflow-uri", uri]) == 0
    said = capsys.readouterr().out
    assert said == f"{name} v{back} is now champion (was v{forced['version']}), by promotion\n", said
    assert registry.show(uri, f"{name}@champion")["version"] == back
    assert main(["registry", "promote", name, back, "--mlflow-uri", uri, "--json"]) == 0  # again: no move
    document = json.loads(capsys.readouterr().out)
    assert document == {"name": name, "version": back, "champion": back, "previous": back}
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    record = json.loads(c.get_model_version(name, back).tags["segnet.promoted"])
    assert record["was"] == forced["version"] and record["newest"] == int(forced["version"])
    source = c.get_model_version(name, back)  # as a registration killed before its version was complete:
    half = c.create_model_version(name, source.source, run_id=source.run_id).version
    for version, message in ((half, "is not complete"), ("99", "has no version 99")):
        assert main(["registry", "promote", name, str(version), "--mlflow-uri", uri]) == 2
        out = capsys.readouterr()
        assert message in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert registry.show(uri, f"{name}@champion")["version"] == back


def test_registry_cli_list_and_show(search, segnet_cli):
    cfg, _ = search
    r = segnet_cli("registry", "list", "--mlflow-uri", cfg.train.mlflow_uri)
    assert r.returncode == 0 and "segnet-camvid" in r.stdout and "@champion" in r.stdout
    r = segnet_cli("registry", "show", "segnet-camvid/1", "--mlflow-uri", cfg.train.mlflow_uri, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == "1", r.stdout + r.stderr


def test_tampered_weights_are_refused(search, tmp_path):
    cfg, summary = search
    model = registry.load(cfg.train.mlflow_uri, "segnet-camvid@champion")  # loads while intact
    assert model is not None
    v = registry.resolve_version(cfg.train.mlflow_uri, "segnet-camvid@champion")
    import mlflow

    mlflow.set_tracking_uri(cfg.train.mlflow_uri)
    local = mlflow.artifacts.download_artifacts(
        f"models:/segnet-camvid/{v.version}", dst_path=str(tmp_path / "m")
    )
    weights = next(p for p in __import__("pathlib").Path(local).rglob("model.pt"))
    flip_a_byte(weights, at=-100)
    with pytest.raises(Exception, match="changed after logging"):
        mlflow.pyfunc.load_model(local)


@pytest.mark.parametrize(
    "ref, message",
    [
        ("nope@champion", "no registered model 'nope'.*segnet-camvid"),
        ("segnet-camvid@gold", "aliases: @champion"),
    ],
)
def test_unknown_model_or_alias_lists_what_exists(search, ref, message):
    cfg, _ = search
    with pytest.raises(SegNetError, match=message):
        registry.resolve_version(cfg.train.mlflow_uri, ref)


def test_an_undecodable_image_is_named_skipped_and_counted(
    search, camvid_dir, png_declaring, tmp_path, segnet_cli
):
    cfg, _ = search
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "in" / "bomb.png").write_bytes(png_declaring(30000, 30000))  # 83 bytes, 900 M pixels
    good = sorted((camvid_dir / "test").iterdir())[0]
    (tmp_path / "in" / "cut.png").write_bytes(good.read_bytes()[:5000])
    (tmp_path / "in" / "sub" / good.name).write_bytes(good.read_bytes())
    r = segnet_cli(
        "predict",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "o"),
        "--mlflow-uri",
        cfg.train.mlflow_uri,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "bad.png cannot be decoded" in r.stdout and "skipped 3 unreadable images" in r.stdout
    assert "bomb.png is over the limit of 40,000,000 pixels" in r.stdout
    assert "cut.png cannot be decoded" in r.stdout
    written = list((tmp_path / "o").rglob("*.png"))
    assert written == [tmp_path / "o" / "sub" / good.name]  # the good one only, beside the input's layout


def test_unreachable_registry_is_one_line_with_the_uri(tmp_path, segnet_cli):
    r = segnet_cli("registry", "list", "--mlflow-uri", "http://127.0.0.1:9", timeout=120)
    error_line(r)
    assert "http://127.0.0.1:9" in r.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr_min": 0.1, "lr_max": 0.01}, "must be positive and at most lr_max"),
        ({"class_weighting": ["none", "log"]}, "class_weighting 'log': choose one of"),
    ],
)
def test_bad_search_space_is_refused(shards, tmp_path, change, message):
    with pytest.raises(SegNetError, match=message):
        tune_search(_cfg(shards, tmp_path, **change))


def test_interrupted_search_resumes_without_rerunning_finished_trials(shards, tmp_path, segnet_cli):
    args = ["tune", "--data", str(shards), "--num-samples", "3", "--epochs", "1", "--image-size", "64x96"]
    args += ["--batch-size", "4", "--max-concurrent", "1", "--scheduler", "fifo", "--loader-workers", "0"]
    uri = mlflow_store(tmp_path / "mlruns.db")
    args += ["--storage-path", str(tmp_path / "runs"), "--mlflow-uri", uri]
    args += ["--name", "s2"]
    proc = start_segnet(*args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = []

    def a_trial_finished() -> bool:
        try:
            c = MlflowClient(tracking_uri=uri)
            runs = c.search_runs([c.get_experiment_by_name("segnet-camvid").experiment_id])
        except Exception:  # noqa: BLE001 - the store may not exist yet
            return False
        finished[:] = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
        return bool(finished)

    no_trial = "no trial finished before the search could be interrupted"
    wait_until(a_trial_finished, 400, proc, say=lambda: no_trial, every=1)
    assert proc.poll() is None, no_trial
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=180)
    done_name = finished[0].info.run_name
    logs = {"SEGNET_LOG_DIR": str(tmp_path / "logs"), "SEGNET_PROGRESS_BAR": "1"}  # bars, as in a terminal
    args = ["tune", "--resume", "s2", "--storage-path", str(tmp_path / "runs"), "--json"]
    r = segnet_cli(*args, env=logs, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(json.loads(r.stdout)) == {"search", "test", "registered"}  # stdout: the document alone
    # the console holds the project's lines: no Ray or MLflow INFO or WARNING record (`-v` shows them),
    # MLflow's prints in the log file instead, a progress bar within each epoch, then the epoch's line
    console = r.stdout + r.stderr
    assert not re.search(r"\b(INFO|WARNING)\b", console), console[-3000:]
    assert "Successfully registered model" not in console and "Downloading artifacts" not in console
    assert "Successfully registered model" in "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert re.search(r"epoch 1/1: +\d+%", console) and re.search(r"epoch 1/1  loss", console), console[-3000:]
    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("segnet-camvid").experiment_id])
    trial_runs = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    # the finished trial was not re-run
    assert [run.info.run_name for run in trial_runs].count(done_name) == 1
    assert len({run.info.run_name for run in trial_runs}) == 3
    assert registry.show(uri, "segnet-camvid@champion")["version"] == "1"


def test_a_restored_trial_whose_run_trained_every_epoch_reports_its_last_epoch_and_trains_nothing(
    ray_local, tmp_path
):
    """A search stopped between a trial run's end and Tune's record of it restores that trial as unfinished:
    in a real Tune trial, `report_finished_run` reports the run's last epoch from its newest checkpoint
    (with that checkpoint's path, as TuneReportCallback does) instead of training it again; a run with
    epochs to go is left to train."""
    import torch
    from ray import tune

    from pipelines.core import checkpoint as ckpt_io
    from pipelines.search.plan import report_finished_run
    from segnet import build_model

    model = build_model("segnet-basic", num_classes=11)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = {"epoch": 1, "val_miou": 0.25, "val_bf": float("nan")}
    folder = tmp_path / "runs" / "t" / "checkpoint_2026-12-02_06-00-00.000000"
    ckpt_io.save(folder, model, optimizer, 1, {"config": {"model": "segnet-basic"}, "metrics": metrics})
    cfg = TrainConfig(data=str(tmp_path), storage_path=str(tmp_path / "runs"), name="t")

    def trial(config):
        trained = not report_finished_run(replace(cfg, epochs=config["epochs"]))
        tune.report({"trained": trained})

    space = {"epochs": tune.grid_search([2, 3])}
    run = tune.RunConfig(storage_path=str(tmp_path / "tune"), name="r")
    results = tune.Tuner(trial, param_space=space, run_config=run).fit()
    by_epochs = {r.config["epochs"]: r.metrics_dataframe for r in results}
    finished, unfinished = by_epochs[2], by_epochs[3]
    assert len(finished) == 2 and finished["val_miou"][0] == 0.25 and finished["trained"][1] == False  # noqa: E712
    assert finished["checkpoint_path"][0] == str(folder) and "val_bf" not in finished  # NaN is not reported
    assert len(unfinished) == 1 and unfinished["trained"][0] == True  # noqa: E712


def test_a_trial_whose_worker_is_killed_recovers_and_reports_each_epoch_once(
    shards, tmp_path, train_worker_killer
):
    """--max-failures reaches the trial's TorchTrainer: a worker killed (SIGKILL, from here) after the first
    checkpoint is replaced, training resumes from that checkpoint, and the search completes."""
    cfg = _cfg(
        shards,
        tmp_path,
        name="killed",
        num_samples=1,
        epochs=3,
        scheduler="fifo",
        max_failures=1,
        image_size="128x160",
    )

    first_checkpoint = lambda: any(complete_checkpoints(d) for d in (tmp_path / "runs").glob("killed-*"))  # noqa: E731
    with train_worker_killer(first_checkpoint) as killed:
        summary = tune_search(cfg)
    assert killed, "no worker was killed"
    assert summary["trials"][0]["epochs"] == 3 and not summary["trials"][0]["error"]
    (results,) = (tmp_path / "runs" / "killed").glob("*/result.json")  # the trial's history in Tune
    # no epoch twice, and the last one there; the epoch whose report was in flight when its worker died
    # (checkpoint written, Tune not yet told) may be missing from Tune's history, not from MLflow's below
    epochs = [json.loads(line)["epoch"] for line in results.read_text().splitlines()]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 2, epochs
    meta = json.loads(open(f"{summary['best']['checkpoint']}/meta.json").read())
    run = MlflowClient(tracking_uri=cfg.train.mlflow_uri).get_metric_history(
        meta["mlflow_run_id"], "val_miou"
    )
    assert sorted(m.step for m in run) == [0, 1, 2]  # and in MLflow
