"""`segnet train`: SegNet on shards with Ray Train (DDP), per-epoch validation and checkpoints.

`train(cfg)` reads as its phases: resolve the run (the resume point, absolute locations), check the data
and the cluster before any worker starts, plan what the workers are given, build one TorchTrainer around the
worker loop (`pipelines/train/worker.py`), fit it, and pick the best checkpoint.
"""

import contextlib
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import ray.train

from data_prep import storage
from data_prep.shards import dataset_of, init_ray, read_manifest_and_id
from pipelines.config import TrainConfig, named_for, worker_range
from pipelines.core import checkpoint as ckpt_io
from pipelines.core import console
from pipelines.core.checks import check_config, check_resources, image_size
from pipelines.core.plots import save_validation_plots
from pipelines.tracking import registry, runs
from pipelines.tracking.callback import ENDED_AT, LogMetrics
from pipelines.train.worker import WorkerPlan, init_weights_folder, train_loop
from segnet.errors import SegNetError
from segnet.models import model_from_meta

RUN_FILE = "segnet_run.json"
PLOTS = "plots"  # the run's PNGs in MLflow, drawn from its newest checkpoint
# While an elastic run is healthy, Ray Train asks this often whether more workers fit now (its default). A
# resize restarts the workers from the last checkpoint, so the epoch in progress is trained again.
RESIZE_CHECK_S = 60.0


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    num_classes: int | None = None,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
) -> dict:
    """Check, then fit one TorchTrainer; returns the best checkpoint and its metrics.

    A Tune trial calls this too, with the search's MLflow run as parent and Tune's report callback; Tune
    may stop it before it records its end, so the search records that (`close_run`)."""
    cfg, run_id = resolve_run(cfg, resume)
    manifest, sha = read_manifest_and_id(cfg.data)  # once: every check and reader below is handed it
    check_config(cfg, num_classes, manifest)
    cfg = replace(cfg, experiment=cfg.experiment or named_for(dataset_of(manifest)))
    uri = runs.tracking_uri(cfg.mlflow_uri)
    runs.check(uri)  # one line now, not after Ray and the workers have started
    stage_init_weights(cfg, uri, len(manifest["classes"]))
    init_ray(cfg.address)
    check_resources(cfg)
    plan = plan_run(cfg, manifest, sha, uri, run_id, parent_run_id)
    trainer = build_trainer(plan, uri, callbacks or [])
    result = fit(trainer, plan, uri, ends_run=parent_run_id is None)
    best, last = pick_best(result, plan, uri)
    record_run(uri, plan.run_id, best, last)
    return best


def resolve_run(cfg: TrainConfig, resume: str | None) -> tuple[TrainConfig, str | None]:
    """(config, MLflow run id to continue or None): the run's config with absolute locations (workers run in
    other directories and, on a cluster, other machines) and a name; resuming, the saved one."""
    run_id = None
    if resume:
        cfg, run_id = resume_point(cfg, resume)
    if not cfg.data:
        raise SegNetError("data: no shard folder or URI given (--data, or --resume RUN)")
    vgg16 = str(Path(cfg.vgg16_weights).resolve()) if cfg.vgg16_weights else None
    name = cfg.name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage.absolute(cfg.storage_path)
    resolved = replace(
        cfg, data=storage.absolute(cfg.data), storage_path=root, vgg16_weights=vgg16, name=name
    )
    return resolved, run_id


def resume_point(cfg: TrainConfig, resume: str) -> tuple[TrainConfig, str]:
    """The config and MLflow run of the run to resume (a run name under --storage-path, or the run's folder
    or URI), its folder as storage path and name, and --epochs raised to at least its own."""
    root = storage.absolute(cfg.storage_path)
    run_dir = storage.absolute(resume) if storage.is_uri(resume) or Path(resume).is_dir() else None
    run_dir = run_dir or storage.join(root, resume)
    if not ckpt_io.find(run_dir):
        raise SegNetError(f"--resume {resume}: {run_dir} holds no checkpoint to resume from")
    saved = json.loads(storage.read_bytes(storage.join(run_dir, RUN_FILE)))
    root, name = run_dir.rsplit("/", 1)
    before = TrainConfig(**saved["config"])
    epochs = max(cfg.epochs, before.epochs)
    return replace(before, epochs=epochs, storage_path=root, name=name), saved["mlflow_run_id"]


def stage_init_weights(cfg: TrainConfig, uri: str, num_classes: int) -> None:
    """--init-from, resolved here on the driver (a registered model needs MLflow): its model.pt and meta.json
    are copied into the run's folder, where every worker loads them; tried on this run's model first, so a
    checkpoint of another model fails now, with the count of tensors loaded and skipped printed once."""
    if not cfg.init_from:
        return
    dest = init_weights_folder(cfg)
    if not ckpt_io.verifies(dest):  # staged already when the run is resumed
        with tempfile.TemporaryDirectory() as tmp:
            source = cfg.init_from
            if source.startswith("models:/"):
                source = str(registry.download_weights(uri, source, tmp))
            elif not ckpt_io.verifies(storage.absolute(source)):
                raise SegNetError(
                    f"--init-from {source}: not a checkpoint that verifies (a folder or URI with "
                    f"{ckpt_io.WEIGHTS} and {ckpt_io.META}), nor models:/NAME@ALIAS"
                )
            for name in (ckpt_io.WEIGHTS, ckpt_io.META):
                data = storage.read_bytes(storage.join(storage.absolute(source), name))
                storage.write_bytes(storage.join(dest, name), data)
    model = model_from_meta({"config": asdict(cfg), "num_classes": num_classes})
    loaded, skipped = ckpt_io.load_matching(dest, model)
    new = f"; new: {', '.join(skipped)}" if skipped else ""
    print(f"initialised from {cfg.init_from}: {loaded} tensors loaded, {len(skipped)} skipped{new}")


def plan_run(
    cfg: TrainConfig, manifest: dict, sha: str, uri: str, run_id: str | None, parent_run_id: str | None
) -> WorkerPlan:
    """What every worker is given; a new run is started in MLflow, and the run file (config and MLflow run,
    what `--resume` reads) written to the run's folder."""
    if run_id is None:
        run_id = runs.start_run(uri, cfg.experiment, cfg.name, cfg, cfg.data, sha, parent_run_id)
    run_file = json.dumps({"config": asdict(cfg), "mlflow_run_id": run_id}, indent=2)
    storage.write_bytes(storage.join(cfg.storage_path, cfg.name, RUN_FILE), run_file.encode())
    weighting = cfg.class_weighting
    return WorkerPlan(
        train=cfg,
        image_size=image_size(cfg, manifest),
        num_classes=len(manifest["classes"]),
        dataset=dataset_of(manifest).to_dict(),
        class_weights=None if weighting == "none" else manifest["class_weights"][weighting],
        manifest_sha256=sha,
        run_id=run_id,
    )


def build_trainer(plan: WorkerPlan, uri: str, callbacks: list):
    """One TorchTrainer: elastic within --workers MIN-MAX, restarts from the last checkpoint after a lost
    worker (--max-failures), keeps the --keep-checkpoints best by --metric."""
    from ray.train.torch import TorchTrainer

    cfg = plan.train
    low, high = worker_range(cfg.workers)
    # A bucket through storage's filesystem, whose S3 requests are retried (throttling, 5xx, resets)
    filesystem, path = storage.resolve(cfg.storage_path) if storage.is_uri(cfg.storage_path) else (None, None)
    return TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=low if low == high else (low, high),
            elastic_resize_monitor_interval_s=RESIZE_CHECK_S,
            use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path or cfg.storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (worker group, checkpoints, reports) in its log files unless `segnet -v`
            logging_config=ray.train.LoggingConfig(log_level="INFO" if console.verbose() else "ERROR"),
            callbacks=[LogMetrics(uri, plan.run_id), *callbacks],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=cfg.metric,
                checkpoint_score_order="max",
            ),
        ),
    )


def fit(trainer, plan: WorkerPlan, uri: str, ends_run: bool = True) -> ray.train.Result:
    """Train; a failed run is marked FAILED in MLflow (unless its search ends it: `ends_run` False, as
    Tune stopping a trial fails its fit too) and becomes one SegNetError."""
    cfg, (h, w) = plan.train, plan.image_size
    print(
        f"training {cfg.model} on {cfg.data} with {cfg.workers} workers at {h}x{w}; "
        f"run {cfg.name}, MLflow run {plan.run_id} in {uri}",
        flush=True,
    )
    try:
        console.sigterm_as_ctrl_c()  # after ray.init, whose core worker installs its own SIGTERM handler
        return trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the checkpoints so far stay for `--resume`
        with contextlib.suppress(SegNetError):  # a server away then is no reason for a second line
            if ends_run:
                runs.end_run(uri, plan.run_id, "KILLED", wait_s=10)
        raise
    except Exception as e:
        try:
            if ends_run:
                runs.end_run(uri, plan.run_id, "FAILED", wait_s=30)
        except SegNetError as lost:
            print(lost, flush=True)
        raise SegNetError(f"training run {cfg.name} failed: {e}") from e


def pick_best(result: ray.train.Result, plan: WorkerPlan, uri: str) -> tuple[dict, str]:
    """(summary, last checkpoint): the kept checkpoint with the best --metric that verifies, its metrics,
    the last epoch's metrics and the whole history (from the last checkpoint)."""
    cfg = plan.train
    ranked = sorted(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.metric, -1), reverse=True)
    ranked = [(storage.uri(c.filesystem, c.path), m) for c, m in ranked]
    best_uri, best_metrics = next(((u, m) for u, m in ranked if ckpt_io.verifies(u)), (None, None))
    if best_uri is None:
        runs.end_run(uri, plan.run_id, "FAILED", wait_s=30)
        raise SegNetError(f"training run {cfg.name} finished, but none of its checkpoints verifies")
    last = storage.uri(result.checkpoint.filesystem, result.checkpoint.path)
    best = {
        "run": cfg.name,
        "run_dir": storage.join(cfg.storage_path, cfg.name),
        "mlflow_run_id": plan.run_id,
        "best_checkpoint": best_uri,
        "best_epoch": best_metrics["epoch"],
        "metric": cfg.metric,
        "best_metrics": validation_scores(best_metrics),
        "last_metrics": {k: v for k, v in result.metrics.items() if "iou_" not in k and k != ENDED_AT},
        "history": json.loads(storage.read_bytes(storage.join(last, ckpt_io.META)))["history"],
    }
    return best, last


def validation_scores(metrics: dict) -> dict:
    """G, C, mIoU and BF of an epoch's metrics (not the per-class IoU)."""
    return {k: v for k, v in metrics.items() if k.startswith("val_") and "iou_" not in k}


def record_run(uri: str, run_id: str, best: dict, last: str, status: str = "FINISHED", tags=None) -> None:
    """What the driver logs when training is done, waiting for the server if it is away: epochs the
    controller could not log (the server was down when training ended), the plots of the last checkpoint,
    the best; then the run's end."""
    filled = runs.fill_history(uri, run_id, best["history"], stamp_key=ENDED_AT)
    if filled:
        print(f"logged the metrics of epochs {filled} from the checkpoint's history", flush=True)
    log_plots(uri, run_id, last)
    tags = {"best_checkpoint": best["best_checkpoint"], "best_epoch": best["best_epoch"], **(tags or {})}
    runs.set_tags(uri, run_id, tags)
    runs.log_metrics(uri, run_id, {f"best_{k}": v for k, v in best["best_metrics"].items()}, step=0)
    runs.end_run(uri, run_id, status)


def log_plots(uri: str, run_id: str, checkpoint: str) -> None:
    """The run's PNGs under plots/, drawn here from a checkpoint's numbers (its validation confusion matrix
    and example predictions, its history of every epoch): workers never draw, nor wait on the server."""
    found = ckpt_io.read_validation(checkpoint)
    if found is None:  # a checkpoint written before checkpoints held them
        return
    (confusion, examples), meta = found, ckpt_io.read_meta(checkpoint)
    dataset = dataset_of(meta, f"{checkpoint}/{ckpt_io.META}")
    with tempfile.TemporaryDirectory() as tmp:
        save_validation_plots(Path(tmp), confusion, meta["history"], examples, dataset, meta["epoch"])
        runs.log_artifacts(uri, run_id, Path(tmp), PLOTS)


def close_run(run_dir: str, error: str = "") -> str | None:
    """Record the end of a run whose driver did not, from the run's folder, as the driver would have: Tune
    stops a trial (ASHA, at a rung or at its last epoch) before the trial's driver records its end, and a
    failed trial's driver never does. The epochs MLflow lacks, the plots of the newest checkpoint that
    verifies and the best by --metric are logged, and the run ended: FAILED with the tag `error` when given,
    else FINISHED, tagged `stopped_early` when it trained fewer epochs than asked. A FINISHED run is left as
    it is. Returns the MLflow run id (None when the run never started)."""
    if not storage.exists(storage.join(run_dir, RUN_FILE)):
        return None
    saved = json.loads(storage.read_bytes(storage.join(run_dir, RUN_FILE)))
    cfg, run_id = TrainConfig(**saved["config"]), saved["mlflow_run_id"]
    uri = runs.tracking_uri(cfg.mlflow_uri)
    if runs.status(uri, run_id) == "FINISHED":
        return run_id
    status, tags = ("FAILED", {"error": error}) if error else ("FINISHED", {})
    kept = [(c, ckpt_io.read_meta(c)) for c in ckpt_io.find(run_dir) if ckpt_io.verifies(c)]
    if not kept:
        runs.set_tags(uri, run_id, tags)
        runs.end_run(uri, run_id, status)
        return run_id
    last, meta = kept[-1]
    if meta["epoch"] + 1 < cfg.epochs and not error:
        tags["stopped_early"] = f"after epoch {meta['epoch'] + 1} of {cfg.epochs}"
    best_checkpoint, best_meta = max(kept, key=lambda cm: cm[1]["metrics"].get(cfg.metric, -1))
    best = {"best_checkpoint": best_checkpoint, "best_epoch": best_meta["epoch"], "history": meta["history"]}
    best["best_metrics"] = validation_scores(best_meta["metrics"])
    record_run(uri, run_id, best, last, status, tags)
    return run_id
