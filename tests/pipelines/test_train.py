import copy
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.config import TrainConfig, worker_range
from pipelines.core.checkpoint import find, read_validation
from pipelines.core.checkpoint import load as load_checkpoint
from pipelines.core.checks import check_resources
from pipelines.evaluate import evaluate
from pipelines.train.driver import close_run, train
from segnet import SegNetError
from tests.helpers import complete_checkpoints, error_line, free_port, mlflow_store

pytestmark = pytest.mark.slow
SIZE = "64x96"  # reduced resolution keeps a CPU epoch to seconds


@pytest.fixture(scope="module")
def shards(shards_24):
    """The session's 24-image shards (tests/conftest.py), read-only."""
    return shards_24


def _cfg(shards, tmp_path, **kw) -> TrainConfig:
    base = dict(
        data=str(shards),
        model="segnet-basic",
        workers=2,
        epochs=3,
        batch_size=4,
        image_size=SIZE,
        storage_path=str(tmp_path / "runs"),
        loader_workers=0,
    )
    base.update(kw)
    if "mlflow_uri" not in base:  # a test that names another store makes none here
        base["mlflow_uri"] = mlflow_store(tmp_path / "mlruns.db")
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def two_worker_run(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = _cfg(shards, tmp, epochs=4, name="ddp")
    return cfg, train(cfg)


def test_two_worker_ddp_run_trains_and_loss_falls(two_worker_run):
    _, best = two_worker_run
    losses = [h["train_loss"] for h in best["history"]]
    assert [h["epoch"] for h in best["history"]] == [0, 1, 2, 3]
    assert losses[-1] < losses[0]
    assert 0 < best["best_metrics"]["val_global_accuracy"] <= 1


def test_mlflow_holds_params_metrics_and_artifacts(two_worker_run):
    cfg, best = two_worker_run
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    run = client.get_run(best["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "segnet-basic" and run.data.params["workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "val_miou")) == 4
    assert run.data.tags["data.manifest_sha256"]
    assert run.inputs.dataset_inputs[0].dataset.name == "camvid-shards"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_matrix_val.png", "plots/training_curves.png", "plots/overlay_val_0.png"} <= files


def test_every_checkpoint_holds_the_numbers_its_plots_are_drawn_from(two_worker_run):
    """Tune may stop a trial after any epoch, so every checkpoint, not only the last, holds its validation
    confusion matrix and example predictions (the driver draws the plots from the newest)."""
    _, best = two_worker_run
    kept = find(best["run_dir"])
    assert len(kept) >= 2, kept
    for checkpoint in kept:
        confusion, examples = read_validation(checkpoint)
        assert confusion.shape == (11, 11) and confusion.sum() > 0
        assert len(examples) == 3 and all(p.shape == y.shape for _, p, y in examples)


def test_a_run_its_driver_did_not_end_is_closed_from_its_folder(two_worker_run, tmp_path):
    """What a search does for a trial that Tune stopped before the trial recorded its end (`close_run`),
    on a copy of a real run's folder whose MLflow run has nothing yet: every epoch's metrics, the plots of
    the newest checkpoint, the best, FINISHED with `stopped_early` (10 epochs asked, 4 trained); a run
    that is FINISHED is left as it is."""
    _, best = two_worker_run
    uri, run_dir = mlflow_store(tmp_path / "mlruns.db"), tmp_path / "run"
    c = MlflowClient(tracking_uri=uri)
    run_id = c.create_run(c.create_experiment("closed", (tmp_path / "artifacts").as_uri())).info.run_id
    shutil.copytree(best["run_dir"], run_dir)
    saved = json.loads((run_dir / "segnet_run.json").read_text())
    saved["config"] |= {"mlflow_uri": uri, "epochs": 10}
    (run_dir / "segnet_run.json").write_text(json.dumps({**saved, "mlflow_run_id": run_id}))
    for _ in range(2):
        assert close_run(str(run_dir)) == run_id
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stopped_early"] == "after epoch 4 of 10"
    assert run.data.tags["best_epoch"] == str(best["best_epoch"])
    assert [m.step for m in c.get_metric_history(run_id, "val_miou")] == [0, 1, 2, 3]
    assert len(c.get_metric_history(run_id, "best_val_miou")) == 1  # the second call changed nothing
    files = {a.path for a in c.list_artifacts(run_id, "plots")}
    assert {"plots/confusion_matrix_val.png", "plots/training_curves.png", "plots/overlay_val_2.png"} <= files


def test_evaluate_reproduces_the_reported_metrics(two_worker_run, shards, tmp_path):
    _, best = two_worker_run
    ckpt = best["best_checkpoint"]
    reported = json.loads(open(f"{ckpt}/meta.json").read())["metrics"]
    result = evaluate(ckpt, shards, "val", tmp_path / "eval")
    for key in ("global_accuracy", "class_accuracy", "miou", "bf"):
        assert result[key] == pytest.approx(reported[f"val_{key}"], abs=1e-3)
    assert (tmp_path / "eval" / "confusion_matrix_val.png").stat().st_size > 0
    assert (tmp_path / "eval" / "overlay_val_0.png").stat().st_size > 0


def test_evaluate_cli_prints_the_table(two_worker_run, shards, tmp_path, segnet_cli):
    _, best = two_worker_run
    args = ["evaluate", "--checkpoint", best["best_checkpoint"], "--data", shards, "--split", "test"]
    r = segnet_cli(*args, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "mIoU" in r.stdout and "Bicyclist" in r.stdout
    assert (tmp_path / "confusion_matrix_test.png").exists()


def test_ddp_gradients_equal_single_process_gradients(shards, tmp_path):
    """Two DDP workers on halves of a batch give the gradient of one process on the whole batch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 48)
    y = torch.randint(0, 11, (4, 32, 48))
    y[:, :4] = 11  # some void
    out = tmp_path / "grads.pt"

    def loop(config):
        import ray.train.torch as rt

        from segnet import build_model

        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        torch.manual_seed(0)
        model = rt.prepare_model(
            build_model("segnet-basic", num_classes=11).eval()
        )  # eval: BN uses running stats
        half = slice(2 * rank, 2 * rank + 2)
        torch.nn.functional.cross_entropy(
            model(config["x"][half]), config["y"][half], ignore_index=11
        ).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, config["out"])

    TorchTrainer(
        loop,
        train_loop_config={"x": x, "y": y, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs")),
    ).fit()
    from segnet import build_model

    torch.manual_seed(0)
    model = build_model("segnet-basic", num_classes=11).eval()
    # per-worker means averaged by DDP equal the global mean when both halves have as many valid pixels
    torch.nn.functional.cross_entropy(model(x), y, ignore_index=11).backward()
    ddp = torch.load(out, weights_only=True)
    for name, p in model.named_parameters():
        assert torch.allclose(ddp[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_killed_worker_resumes_from_last_checkpoint(shards, tmp_path, train_worker_killer):
    cfg = _cfg(shards, tmp_path, epochs=3, max_failures=1, name="faulty")
    # in epoch 2, once two checkpoints are written (a kill within a second of a report can lose that report)
    two_checkpoints = lambda: complete_checkpoints(tmp_path / "runs" / "faulty") >= 2  # noqa: E731
    with train_worker_killer(two_checkpoints) as killed:
        best = train(cfg)
    assert killed  # a worker really was killed, from the test
    assert [h["epoch"] for h in best["history"]] == [0, 1, 2]
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    assert client.get_run(best["mlflow_run_id"]).info.status == "FINISHED"
    # the restart began from a checkpoint, not from scratch: epoch 0 was trained once, epoch 2 finished
    steps = [m.step for m in client.get_metric_history(best["mlflow_run_id"], "val_miou")]
    assert sorted(steps) == [0, 1, 2]  # each epoch once: none lost, none trained again after the restart


def test_channels_last_bf16_autocast_and_device_side_input_train(shards, tmp_path):
    """The GPU defaults (augmentation and metrics on the device) through the real worker loop, on a CPU.
    At 48x64: a CPU without bf16 kernels (the AMD EPYC) convolves in bf16 at an eighth of its fp32 rate."""
    fast = dict(amp=True, channels_last=True, input="device", image_size="48x64")
    cfg = _cfg(shards, tmp_path, epochs=1, workers=1, name="fast", **fast)
    first = train(cfg)["history"][0]
    assert np.isfinite(first["train_loss"]) and 0 <= first["val_bf"] <= 1
    assert 0 <= first["data_wait_fraction"] < 1


def test_manifest_is_read_once_on_the_driver_and_once_per_worker(shards, tmp_path, monkeypatch):
    """One `train` of one worker: manifest.json is read once in this process (the checks, the image size and
    the data's identity share it) and once in the worker (its readers share it); the caller's config is left
    as it was (the run's name and absolute locations go into a copy)."""
    import pipelines.train.driver as driver
    from data_prep import storage
    from pipelines.train.worker import train_loop

    reads, read = [], storage.read_bytes

    def counting_read(location):
        reads.extend([location] if str(location).endswith("manifest.json") else [])
        return read(location)

    counts = tmp_path / "worker-reads"
    counts.mkdir()

    def counted_loop(config):  # in the worker's process: count its reads there
        import ray.train

        from data_prep import storage

        seen, read = [], storage.read_bytes
        storage.read_bytes = lambda loc: (
            seen.extend([loc] if str(loc).endswith("manifest.json") else []) or read(loc)
        )
        try:
            train_loop(config)
        finally:
            storage.read_bytes = read
            (counts / f"rank-{ray.train.get_context().get_world_rank()}").write_text(str(len(seen)))

    monkeypatch.setattr(storage, "read_bytes", counting_read)
    monkeypatch.setattr(driver, "train_loop", counted_loop)
    cfg = _cfg(shards, tmp_path, workers=1, epochs=1, batch_size=2, image_size="48x64")
    before = copy.deepcopy(cfg)
    best = train(cfg)
    assert [h["epoch"] for h in best["history"]] == [0]
    assert len(reads) == 1, reads
    assert {p.name: p.read_text() for p in counts.iterdir()} == {"rank-0": "1"}
    assert cfg == before and best["run"].startswith("segnet-basic-")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "segnet-huge"}, "model 'segnet-huge': choose one of"),
        ({"data": "/nonexistent"}, "holds no manifest.json"),
        ({"image_size": "8x8"}, "too small for segnet-basic"),
        ({"workers": 3, "batch_size": 6}, "3 workers need 3 CPUs"),
        ({"batch_size": 5}, "multiple of 2, to split evenly across any worker count of workers 2"),
        ({"workers": "1-3", "batch_size": 4}, "multiple of 6, to split evenly .* workers 1-3"),
        ({"workers": "2-1"}, "workers '2-1': expected N or MIN-MAX"),
        ({"class_weighting": "log"}, "class_weighting 'log': choose one of"),
        ({"sync_bn": True}, "SyncBatchNorm runs on CUDA only"),
        ({"compile": "yes"}, "compile 'yes': choose one of auto, on, off"),
        ({"input": "gpu"}, "input 'gpu': choose one of"),
    ],
)
def test_bad_config_fails_before_any_worker_starts(shards, tmp_path, change, message):
    with pytest.raises(SegNetError, match=message):
        train(_cfg(shards, tmp_path, **change))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value, expected", [(2, (2, 2)), ("3", (3, 3)), ("1-4", (1, 4)), (" 2-2 ", (2, 2))])
def test_worker_range_reads_a_count_or_a_range(value, expected):
    assert worker_range(value) == expected


@pytest.mark.parametrize("value", [0, "0-2", "3-1", "1-", "-2", "1-2-3", "two", "1.5"])
def test_worker_range_refuses_what_is_not_a_range(value):
    with pytest.raises(SegNetError, match="expected N or MIN-MAX with 1 <= MIN <= MAX"):
        worker_range(value)


def test_an_elastic_run_needs_room_for_its_minimum_only(ray_local):
    check_resources(TrainConfig(workers="2-3"))  # this Ray has 2 CPUs: MIN fits
    with pytest.raises(SegNetError, match="3 workers need 3 CPUs"):
        check_resources(TrainConfig(workers="3-4"))


def test_class_count_and_resume_path_are_checked(shards, tmp_path):
    with pytest.raises(SegNetError, match="--num-classes 12 does not match the manifest's 11"):
        train(_cfg(shards, tmp_path), num_classes=12)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(SegNetError, match="holds no checkpoint"):
        train(_cfg(shards, tmp_path), resume="empty")


def test_train_cli_bad_input_is_one_line(shards, tmp_path, segnet_cli):
    r = segnet_cli("train", "--data", shards, "--model", "nope", cwd=tmp_path)
    assert error_line(r, "train").startswith("segnet train: error: model 'nope': choose one of")


def test_unreachable_mlflow_is_one_line_before_any_worker_starts(shards, tmp_path, segnet_cli):
    with pytest.raises(SegNetError, match=r"MLflow tracking store http://127.0.0.1:9 does not answer"):
        train(_cfg(shards, tmp_path, mlflow_uri="http://127.0.0.1:9"))
    assert not (tmp_path / "runs").exists()  # no run folder: nothing was started
    args = ["train", "--data", str(shards), "--mlflow_uri", "http://127.0.0.1:9", "--workers", "1"]
    args += ["--batch_size", "2", "--storage_path", str(tmp_path / "r")]
    ray_tmp = tmp_path / "ray-tmp"  # where a Ray started by this command would put its session folder
    r = segnet_cli(*args, cwd=tmp_path, env={"RAY_TMPDIR": str(ray_tmp)}, timeout=300)
    line = error_line(r, "train")
    assert line.startswith("segnet train: error: MLflow tracking store http://127.0.0.1:9 does not answer")
    assert not list(ray_tmp.glob("**/session_*")), "a local Ray was started before the check refused"


def test_a_30s_mlflow_outage_during_training_loses_no_epoch(shards, tmp_path, start_mlflow):
    """The tracking server is stopped for 30 s in the middle of a run and started again on the same port and
    store: training goes on, and every epoch's metrics are in the run afterwards, once each."""
    EPOCHS = 6  # the outage begins after the first: on a fast machine training ends while the server is down
    folder, port = tmp_path / "mlflow", free_port()
    server = start_mlflow(folder, port)
    uri = f"http://127.0.0.1:{port}"
    small = {"workers": 1, "batch_size": 2, "epochs": EPOCHS, "image_size": "48x64", "keep_checkpoints": 2}
    cfg = _cfg(shards, tmp_path, mlflow_uri=uri, name="outage", **small)
    seen = {}

    def outage():
        nonlocal server
        while not list((tmp_path / "runs" / "outage").glob("checkpoint_*/meta.json")):
            time.sleep(0.2)
        server.terminate()
        server.wait(30)
        seen["down"] = _epochs_checkpointed(tmp_path / "runs" / "outage")
        time.sleep(30)
        seen["up"] = _epochs_checkpointed(tmp_path / "runs" / "outage")
        server = start_mlflow(folder, port)
        seen["answering_ms"] = time.time() * 1000

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    best = train(cfg)
    thread.join(120)
    assert seen["up"] > seen["down"], "no epoch ended while the server was down: the outage spanned none"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(best["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("val_miou", "train_loss", "val_iou_Road"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), (key, steps)  # no hole, no epoch twice
    if seen["up"] < EPOCHS:  # an epoch ended after the server was back: its report sent the buffered ones
        during = range(seen["down"], seen["up"])  # the epochs that ended while the server was down
        stamps = {m.step: m.timestamp for m in client.get_metric_history(run.info.run_id, "val_miou")}
        late = {e: stamps[e] - seen["answering_ms"] for e in during if stamps[e] >= seen["answering_ms"]}
        assert during and not late, f"epochs stamped when sent, not when they ended (ms after): {late}"
    assert [h["epoch"] for h in best["history"]] == list(range(EPOCHS))
    assert "plots/training_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    model, meta = load_checkpoint(best["best_checkpoint"])  # checkpoints unaffected: the best one loads
    assert meta["epoch"] == best["best_epoch"]


def _epochs_checkpointed(run_dir) -> int:
    metas = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/meta.json")]
    return max((m["epoch"] + 1 for m in metas), default=0)
