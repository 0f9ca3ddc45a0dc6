"""`segnet train`, `evaluate` and `train --resume` with every location in the loopback S3 bucket, run from
a directory that holds no project files."""

import json

import pytest

from data_prep import storage
from tests.helpers import mlflow_store

pytestmark = pytest.mark.slow


def _json(r) -> dict:
    """The JSON document of a successful `segnet train --json` or `evaluate --json`: all of stdout."""
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return json.loads(r.stdout)


def test_train_evaluate_and_resume_through_the_bucket_from_an_empty_directory(
    s3, bucket_shards, tmp_path, segnet_cli
):
    shards, runs = bucket_shards, f"{s3['bucket']}/runs-test/runs"
    work = tmp_path / "empty"
    work.mkdir()
    mlflow = mlflow_store(tmp_path / "mlflow" / "mlruns.db")
    train = [
        "train",
        "--data",
        shards,
        "--storage-path",
        runs,
        "--epochs",
        "1",
        "--image-size",
        "64x96",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--loader-workers",
        "0",
        "--mlflow-uri",
        mlflow,
        "--name",
        "r1",
        "--json",
    ]
    best = _json(segnet_cli(*train, cwd=work))
    checkpoint = best["best_checkpoint"]
    assert checkpoint.startswith(f"{runs}/r1/checkpoint_")
    evaluate = ["evaluate", "--checkpoint", checkpoint, "--data", shards, "--split", "val", "--json"]
    result = _json(segnet_cli(*evaluate, cwd=work))
    assert result["miou"] == pytest.approx(best["best_metrics"]["val_miou"], abs=1e-3)
    assert "metrics.json" in storage.list_names(f"{checkpoint}/eval-val")
    resume = ["train", "--resume", f"{runs}/r1", "--epochs", "2", "--mlflow-uri", mlflow, "--json"]
    resumed = _json(segnet_cli(*resume, cwd=work))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    assert list(work.iterdir()) == []  # nothing written where the commands ran
