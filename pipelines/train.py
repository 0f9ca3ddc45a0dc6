"""`segnet train`: SegNet on CamVid shards with Ray Train (DDP), per-epoch validation and checkpoints.

One `train_loop(config)` runs on every worker, as in Ray's own examples; `train(cfg)` checks the
configuration before any worker starts, builds one TorchTrainer and fits it.
"""

import functools
import json
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray.train
import torch

from data_prep import storage
from data_prep.augment import (
    AugmentConfig,
    ShardDataset,
    eval_loader,
    make_loader,
    parse_size,
    train_transform,
)
from data_prep.device_augment import DeviceBatches
from data_prep.shards import ShardReader, init_ray, manifest_id, read_manifest, verify_shards
from pipelines import checkpoint as ckpt_io
from pipelines import console, tracking
from pipelines.config import TrainConfig, worker_range
from pipelines.engine import compile_model, evaluate, scores, train_epoch, use_compile
from pipelines.plots import display_image, save_confusion_matrix, save_curves, save_overlay
from segnet import segmentation_loss
from segnet.errors import SegNetError
from segnet.models import min_input_size, model_from_meta

RUN_FILE = "segnet_run.json"
PLOTS = "plots"  # the last checkpoint's PNGs, logged to MLflow under this name
# While an elastic run is healthy, Ray Train asks this often whether more workers fit now (its default). A
# resize restarts the workers from the last checkpoint, so the epoch in progress is trained again.
RESIZE_CHECK_S = 60.0


def image_size(cfg: TrainConfig, shard_dir: str) -> tuple[int, int]:
    """--image-size, else the size of the data's first validation image."""
    if cfg.image_size:
        return parse_size(cfg.image_size)
    return tuple(ShardReader(shard_dir, "val", verify=False)[0]["label"].shape)


def check_config(cfg: TrainConfig, num_classes: int | None = None) -> dict:
    """What depends on the data, checked before any worker starts (TrainConfig checks its own values)."""
    manifest = read_manifest(cfg.data)
    verify_shards(cfg.data, manifest, "train")
    verify_shards(cfg.data, manifest, "val")
    classes = len(manifest["classes"])
    if num_classes is not None and num_classes != classes:
        raise SegNetError(f"--num-classes {num_classes} does not match the manifest's {classes} classes")
    h, w = image_size(cfg, cfg.data)
    smallest = min_input_size(cfg.model)
    if h < smallest or w < smallest:
        raise SegNetError(f"image_size {h}x{w} is too small for {cfg.model}: each side must be >= {smallest}")
    if cfg.vgg16_weights and not Path(cfg.vgg16_weights).is_file():
        raise SegNetError(f"vgg16_weights {cfg.vgg16_weights} does not exist")
    return manifest


def check_resources(cfg: TrainConfig) -> None:
    """More workers than the cluster can place would wait forever: say so at once; or, with
    --placement-timeout, ask the autoscaler for them (a cluster like infra/cluster.yaml, whose GPU nodes start
    at min_workers: 0) and wait that long for nodes to join. An elastic run needs room for its MIN workers."""
    import ray
    from ray.autoscaler.sdk import request_resources

    low, high = worker_range(cfg.workers)
    need_cpu = low * cfg.cpus_per_worker
    need_gpu = low * cfg.gpus_per_worker

    def shortfall() -> str:
        have = ray.cluster_resources()
        if have.get("CPU", 0) >= need_cpu and have.get("GPU", 0) >= need_gpu:
            return ""
        return (
            f"{low} workers need {need_cpu} CPUs and {need_gpu:g} GPUs; the Ray cluster has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs"
        )

    short = shortfall()
    if not short:
        return
    if cfg.placement_timeout <= 0:
        raise SegNetError(f"{short} (on an autoscaling cluster, --placement-timeout SECONDS waits for nodes)")
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    request_resources(bundles=[bundle] * high)
    print(f"waiting up to {cfg.placement_timeout:g} s for the autoscaler to add nodes: {short}", flush=True)
    deadline = time.monotonic() + cfg.placement_timeout
    while short := shortfall():
        if time.monotonic() > deadline:
            raise SegNetError(f"no room after --placement-timeout {cfg.placement_timeout:g} s: {short}")
        time.sleep(2)
    print("the cluster has room now", flush=True)


def input_batches(cfg: TrainConfig, size, rank: int, world: int, device: torch.device):
    """This worker's training and validation batches: augmented on the device (GPU default), or by
    albumentations in DataLoader workers (CPU default, and for users' own transforms).

    Each worker takes global // world images a step, so a step sees the same global batch (and the same
    learning rate applies) whether an elastic run has MIN or MAX workers; DDP's mean of the workers'
    gradients is then the gradient of the whole batch. Gradient accumulation was not chosen: it would
    change BatchNorm's batches and the step count per epoch with the worker count; TrainConfig instead asks
    for a global batch that every worker count of the range divides."""
    per_worker = cfg.batch_size // world
    if cfg.input == "device" or (cfg.input == "auto" and device.type == "cuda"):
        common = {"rank": rank, "world": world, "device": device}
        train = DeviceBatches.from_shards(
            cfg.data,
            "train",
            per_worker,
            size,
            augment=AugmentConfig(*size),
            seed=cfg.seed,
            drop_last=True,
            **common,
        )
        return train, DeviceBatches.from_shards(cfg.data, "val", per_worker, size, **common)
    train_ds = ShardDataset(
        cfg.data, "train", train_transform(AugmentConfig(*size), seed=cfg.seed), verify=False
    )
    loader = make_loader(
        train_ds, per_worker, True, cfg.seed, cfg.loader_workers, rank, world, drop_last=True
    )
    return loader, eval_loader(cfg.data, "val", size, per_worker, rank, world)


# ---------------------------------------------------------------- the per-worker loop


def build_model_and_optimizer(cfg: TrainConfig, num_classes: int, device, world: int):
    model = model_from_meta({"config": asdict(cfg), "num_classes": num_classes}, vgg16_weights=True)
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused
    )
    return model, optimizer


def resume(model, optimizer, cfg: TrainConfig, rank: int, world: int) -> tuple[int, list]:
    """(first epoch, history so far): from the checkpoint Ray Train hands a restarted or resumed run or, when
    that one is damaged, from the run's newest older checkpoint that verifies (with a warning)."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, []
    found = storage.uri(checkpoint.filesystem, checkpoint.path)
    run_dir = storage.join(cfg.storage_path, cfg.name)
    warn = functools.partial(print, flush=True) if rank == 0 else None
    used, meta = ckpt_io.restore_newest_good(found, run_dir, model, optimizer, warn)
    if rank == 0:
        print(
            f"resuming from the checkpoint of epoch {meta['epoch'] + 1} with {world} workers: {used}",
            flush=True,
        )
    return meta["epoch"] + 1, meta["history"]


def train_loop(config: dict) -> None:
    """Every worker runs this: prepare, then per epoch train, evaluate and report (rank 0 checkpoints)."""
    import ray.train.torch

    cfg = TrainConfig(**config["train"])
    console.quiet_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    size, num_classes = tuple(config["image_size"]), config["num_classes"]
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True

    net, optimizer = build_model_and_optimizer(cfg, num_classes, device, world)
    start, history = resume(net, optimizer, cfg, rank, world)
    if use_compile(cfg.compile, device):
        compile_model(net)
    model = ray.train.torch.prepare_model(net)  # DDP when world > 1; `net` stays the plain module
    weights = None if cfg.class_weighting == "none" else config["class_weights"][cfg.class_weighting]
    loss_fn = segmentation_loss(weights).to(device)
    loader, val_loader = input_batches(cfg, size, rank, world, device)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        getattr(getattr(loader, "sampler", loader), "set_epoch", lambda _: None)(epoch)
        images = len(loader) * (cfg.batch_size // world) * world
        with console.progress(images, f"epoch {epoch + 1}/{cfg.epochs}", rank == 0) as advance:
            args = (model, loader, loss_fn, optimizer, device, cfg.amp, cfg.channels_last)
            stats = train_epoch(*args, progress=lambda n: advance(n * world))
        keep = 3 if rank == 0 and epoch == cfg.epochs - 1 else 0
        meter, examples = evaluate(net, val_loader, device, num_classes, cfg.amp, cfg.channels_last, keep)
        meter.all_reduce()  # sums the confusion matrices and BF sums: each image counts once
        metrics = {
            "epoch": epoch,
            "workers": world,
            **stats,
            **scores(meter),
            "epoch_time_s": time.perf_counter() - t0,
        }
        history.append(metrics)  # every epoch's metrics: what MLflow lacks after an outage is logged from it
        report(config, cfg, metrics, history, net, optimizer, rank, meter.matrix.cpu(), examples)


def report(
    config: dict, cfg: TrainConfig, metrics: dict, history: list, net, optimizer, rank: int, cm, examples
) -> None:
    """One epoch's line, checkpoint (rank 0) and report to Ray Train; the PNGs in the last checkpoint."""
    epoch = metrics["epoch"]
    if rank == 0:
        print(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
            f"G {metrics['val_global_accuracy']:.3f}  C {metrics['val_class_accuracy']:.3f}  "
            f"mIoU {metrics['val_miou']:.3f}  BF {metrics['val_bf']:.3f}  "
            f"{metrics['train_images_per_s']:.1f} img/s/worker  {metrics['epoch_time_s']:.0f} s",
            flush=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            meta = {
                "config": asdict(cfg),
                "num_classes": config["num_classes"],
                "image_size": config["image_size"],
                "manifest_sha256": config["manifest_sha256"],
                "metrics": metrics,
                "history": history,
                "mlflow_run_id": config["run_id"],
            }
            ckpt_io.save(Path(tmp), net, optimizer, epoch, meta)
            if epoch == cfg.epochs - 1:
                save_final_plots(Path(tmp) / PLOTS, cm, history, examples)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        finite = {k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)}
        ray.train.report(finite, checkpoint=checkpoint)


def save_final_plots(out: Path, cm, history, examples) -> None:
    """Confusion matrix, prediction overlays and training curves of the last epoch, as PNGs in the last
    checkpoint; the driver logs them to MLflow (workers never wait on the tracking server)."""
    out.mkdir()
    save_confusion_matrix(cm.numpy(), out / "confusion_matrix_val.png", "validation, last epoch")
    np.savetxt(out / "confusion_matrix_val.csv", cm.numpy(), fmt="%d", delimiter=",")
    save_curves(history, out / "training_curves.png")
    for i, (x, pred, y) in enumerate(examples):
        save_overlay(display_image(x, y.shape), pred.numpy(), y.numpy(), out / f"overlay_val_{i}.png")


# ---------------------------------------------------------------- the driver


class LogMetrics(ray.train.UserCallback):
    """Each epoch's metrics to MLflow from the Ray Train controller, once per committed report: an epoch
    that a lost worker had not reported yet, and that is trained again after the restart, is logged once.
    While the server is down, epochs wait in a buffer and go with the first report after it is back; what
    is still buffered when training ends is logged by the driver from the checkpoint's history.
    A change of the worker count (an elastic resize) is also tagged `resize.epoch_N` = "OLD->NEW"."""

    def __init__(self, uri: str, run_id: str):
        self.metrics, self.workers = tracking.MetricBuffer(uri, run_id), None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = metrics[0]
        resized = self.workers not in (None, m["workers"])
        tags = {f"resize.epoch_{m['epoch']}": f"{self.workers}->{m['workers']}"} if resized else {}
        self.metrics.add(m, step=m["epoch"], tags=tags)
        self.workers = m["workers"]


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    num_classes: int | None = None,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
) -> dict:
    """Check, then fit one TorchTrainer; returns the best checkpoint and its metrics.

    A Tune trial calls this too, with the search's MLflow run as parent and Tune's report callback."""
    from ray.train.torch import TorchTrainer

    root = storage.absolute(cfg.storage_path)
    run_id = None
    if resume:  # a run name under --storage-path, or the run's folder or URI
        run_dir = storage.absolute(resume) if storage.is_uri(resume) or Path(resume).is_dir() else None
        run_dir = run_dir or storage.join(root, resume)
        if not ckpt_io.find(run_dir):
            raise SegNetError(f"--resume {resume}: {run_dir} holds no checkpoint to resume from")
        saved = json.loads(storage.read_bytes(storage.join(run_dir, RUN_FILE)))
        epochs = cfg.epochs
        cfg = TrainConfig(**saved["config"])
        cfg.epochs = max(epochs, cfg.epochs)
        (root, cfg.name), run_id = run_dir.rsplit("/", 1), saved["mlflow_run_id"]
    manifest = check_config(cfg, num_classes)
    uri = tracking.tracking_uri(cfg.mlflow_uri)
    tracking.check(uri)  # one line now, not after Ray and the workers have started
    # Workers run in other directories (and, on a cluster, other machines): give them absolute locations.
    cfg.data, cfg.storage_path = storage.absolute(cfg.data), root
    if cfg.vgg16_weights:
        cfg.vgg16_weights = str(Path(cfg.vgg16_weights).resolve())
    size = image_size(cfg, cfg.data)
    name = cfg.name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.name = name
    init_ray(cfg.address)
    check_resources(cfg)
    low, high = worker_range(cfg.workers)

    sha = manifest_id(cfg.data)
    if run_id is None:
        run_id = tracking.start_run(uri, cfg.experiment, name, cfg, cfg.data, sha, parent_run_id)
    run_file = json.dumps({"config": asdict(cfg), "mlflow_run_id": run_id}, indent=2)
    storage.write_bytes(storage.join(root, name, RUN_FILE), run_file.encode())

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "train": asdict(cfg),
            "image_size": list(size),
            "num_classes": len(manifest["classes"]),
            "class_weights": manifest["class_weights"],
            "manifest_sha256": sha,
            "mlflow_uri": uri,
            "run_id": run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=low if low == high else (low, high),
            elastic_resize_monitor_interval_s=RESIZE_CHECK_S,
            use_gpu=cfg.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (worker group, checkpoints, reports) in its log files unless `segnet -v`
            logging_config=ray.train.LoggingConfig(log_level="INFO" if console.verbose() else "ERROR"),
            callbacks=[LogMetrics(uri, run_id), *(callbacks or [])],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=cfg.metric,
                checkpoint_score_order="max",
            ),
        ),
    )
    print(
        f"training {cfg.model} on {cfg.data} with {cfg.workers} workers at {size[0]}x{size[1]}; "
        f"run {name}, MLflow run {run_id} in {uri}",
        flush=True,
    )
    try:
        result = trainer.fit()
    except Exception as e:
        try:
            tracking.end_run(uri, run_id, "FAILED", wait_s=30)
        except SegNetError as lost:
            print(lost, flush=True)
        raise SegNetError(f"training run {name} failed: {e}") from e
    ranked = sorted(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.metric, -1), reverse=True)
    ranked = [(storage.uri(c.filesystem, c.path), m) for c, m in ranked]
    best_uri, best_metrics = next(((u, m) for u, m in ranked if ckpt_io.verifies(u)), (None, None))
    if best_uri is None:
        tracking.end_run(uri, run_id, "FAILED", wait_s=30)
        raise SegNetError(f"training run {name} finished, but none of its checkpoints verifies")
    last = storage.uri(result.checkpoint.filesystem, result.checkpoint.path)
    best = {
        "run": name,
        "run_dir": storage.join(root, name),
        "mlflow_run_id": run_id,
        "best_checkpoint": best_uri,
        "best_epoch": best_metrics["epoch"],
        "metric": cfg.metric,
        "best_metrics": {k: v for k, v in best_metrics.items() if k.startswith("val_") and "iou_" not in k},
        "last_metrics": {k: v for k, v in result.metrics.items() if "iou_" not in k},
        "history": json.loads(storage.read_bytes(storage.join(last, ckpt_io.META)))["history"],
    }
    record_run(uri, run_id, best, last)
    return best


def record_run(uri: str, run_id: str, best: dict, last_checkpoint: str) -> None:
    """What the driver logs when training is done, waiting for the server if it is away: epochs the
    controller could not log (the server was down when training ended), the last epoch's plots, the best."""
    filled = tracking.fill_history(uri, run_id, best["history"])
    if filled:
        print(f"logged the metrics of epochs {filled} from the checkpoint's history", flush=True)
    if storage.exists(storage.join(last_checkpoint, PLOTS, "training_curves.png")):
        with tempfile.TemporaryDirectory() as tmp:
            storage.copy_folder(storage.join(last_checkpoint, PLOTS), tmp)
            tracking.log_artifacts(uri, run_id, Path(tmp), PLOTS)
    tracking.set_tags(
        uri, run_id, {"best_checkpoint": best["best_checkpoint"], "best_epoch": best["best_epoch"]}
    )
    tracking.log_metrics(uri, run_id, {f"best_{k}": v for k, v in best["best_metrics"].items()}, step=0)
    tracking.end_run(uri, run_id)
