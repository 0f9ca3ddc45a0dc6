"""Tracking against a real MLflow server that goes away: what the Ray Train controller logs waits."""

import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import runs
from pipelines.tracking.callback import ENDED_AT, LogMetrics
from tests.helpers import free_port, mlflow_store


@pytest.mark.slow
def test_epochs_logged_while_the_server_is_down_wait_and_arrive_once_it_is_back(tmp_path, start_mlflow):
    """The controller's buffer neither raises nor waits for the server (a blocked controller handles no
    worker failure; an outage longer than MLflow's own retries would otherwise end the run)."""
    folder, port = tmp_path / "mlflow", free_port()
    server = start_mlflow(folder, port)
    uri = f"http://127.0.0.1:{port}"
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("outage")).info.run_id
    server.terminate()
    server.wait(30)
    buffer = runs.MetricBuffer(uri, run_id)
    buffer.add({"epoch": 0, "val_miou": 0.1}, step=0)
    buffer.add({"epoch": 1, "val_miou": 0.2}, step=1, tags={"resize.epoch_1": "2->1"})
    assert [step for step, _, _ in buffer.pending] == [0, 1]
    start_mlflow(folder, port)
    buffer.add({"epoch": 2, "val_miou": 0.3}, step=2)
    assert buffer.pending == []
    history = MlflowClient(uri).get_metric_history(run_id, "val_miou")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert MlflowClient(uri).get_run(run_id).data.tags["resize.epoch_1"] == "2->1"


def test_a_report_seen_late_keeps_the_time_its_epoch_ended(tmp_path):
    """The controller logs a report when it sees it, which may be long after the worker ended the epoch (a
    busy machine, a server that was down): the points carry the worker's time, and the time is no metric."""
    uri = mlflow_store(tmp_path / "m.db")
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("late")).info.run_id
    ended = int(time.time() * 1000) - 60_000  # a minute ago
    report = {"epoch": 0, "workers": 1, "val_miou": 0.5, ENDED_AT: ended}
    LogMetrics(uri, run_id).after_report(None, [report], None)
    (point,) = c.get_metric_history(run_id, "val_miou")
    assert point.timestamp == ended and point.step == 0
    assert ENDED_AT not in c.get_run(run_id).data.metrics


def test_epochs_the_driver_logs_at_the_end_keep_the_time_they_ended(tmp_path):
    """What the controller could not log (the server was still down) the driver logs from the checkpoint's
    history when training ends: stamped when each epoch ended, as the controller would have."""
    uri = mlflow_store(tmp_path / "m.db")
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("filled")).info.run_id
    ended = int(time.time() * 1000) - 60_000
    history = [{"epoch": e, "val_miou": 0.1 * e, ENDED_AT: ended + 1000 * e} for e in range(3)]
    runs.MetricBuffer(uri, run_id).add({"epoch": 0, "val_miou": 0.0}, step=0, stamp_ms=ended)
    assert runs.fill_history(uri, run_id, history, stamp_key=ENDED_AT) == [1, 2]
    stamps = {m.step: m.timestamp for m in c.get_metric_history(run_id, "val_miou")}
    assert stamps == {e: ended + 1000 * e for e in range(3)}
    assert ENDED_AT not in c.get_run(run_id).data.metrics
