"""The Ray Train callback that logs each epoch's metrics to MLflow. Its own module, which imports MLflow only
when a report arrives: Ray hands the run's callbacks to every training worker as well as to the controller,
and a worker that unpickles this class then imports neither MLflow nor the driver (0.75 s of a worker's
start here)."""

import ray.train

# The key of each epoch's metrics (its report, and its entry in the checkpoint's history) that holds when the
# worker ended the epoch, in ms as MLflow stamps points: the controller may see a report late (a busy machine,
# a server that did not answer), and the driver logs what it could not, at the end; both stamp the epoch's
# points with this time, not the time they log them.
ENDED_AT = "ended_at_ms"


class LogMetrics(ray.train.UserCallback):
    """Each epoch's metrics to MLflow from the Ray Train controller, once per committed report: an epoch
    that a lost worker had not reported yet, and that is trained again after the restart, is logged once.
    While the server is down, epochs wait in a buffer and go with the first report after it is back; what
    is still buffered when training ends is logged by the driver from the checkpoint's history.
    A change of the worker count (an elastic resize) is also tagged `resize.epoch_N` = "OLD->NEW"."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self.metrics, self.workers = uri, run_id, None, None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if self.metrics is None:  # on the controller, at its first report
            from pipelines.tracking import runs

            self.metrics = runs.MetricBuffer(self.uri, self.run_id)
        m = dict(metrics[0])
        ended = m.pop(ENDED_AT, None)
        resized = self.workers not in (None, m["workers"])
        tags = {f"resize.epoch_{m['epoch']}": f"{self.workers}->{m['workers']}"} if resized else {}
        self.metrics.add(m, step=m["epoch"], tags=tags, stamp_ms=ended)
        self.workers = m["workers"]
