"""The loop every Ray Train worker runs, as in Ray's own examples: prepare (model, optimiser, resume point,
loss, input batches), then per epoch train, evaluate and report; rank 0 writes the checkpoint."""

import contextlib
import functools
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch

from data_prep import storage
from data_prep.augment import AugmentConfig, ShardDataset, eval_loader, make_loader, train_transform
from data_prep.device_augment import device_batches
from data_prep.shards import MANIFEST, dataset_of, read_manifest_and_id
from pipelines.config import TrainConfig
from pipelines.core import checkpoint as ckpt_io
from pipelines.core import console
from pipelines.core.engine import compile_model, evaluate, scores, train_epoch, use_compile
from pipelines.tracking.callback import ENDED_AT
from segnet import segmentation_loss
from segnet.errors import SegNetError
from segnet.models import model_from_meta

INIT_WEIGHTS = "init_weights"  # --init-from's weights, staged by the driver in the run's folder

# Checkpoints upload while the next epoch trains (a slow bucket need not stall it: docs/benchmarks.md);
# Ray Train commits each, in order, once uploaded, and waits for the last before the run ends.
UPLOAD = ray.train.CheckpointUploadMode.ASYNC


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker is given: the run's TrainConfig (absolute locations, the run's name) and the
    values the driver derived from the data once, as Ray's examples hand a worker a few derived values."""

    train: TrainConfig
    image_size: tuple[int, int]  # (height, width) the model trains at
    num_classes: int
    dataset: dict  # the data's description (data_prep.datasets), recorded in each checkpoint's meta.json
    class_weights: list[float] | None  # the loss's weights for train.class_weighting; None for "none"
    manifest_sha256: str  # the data's identity, recorded in each checkpoint
    run_id: str  # the MLflow run, recorded in each checkpoint


@dataclass
class EpochResult:
    """One epoch's outcome on a worker, as `report` checkpoints and reports it."""

    metrics: dict  # epoch, workers, train_* (engine.train_epoch), val_* (engine.scores), epoch_time_s
    history: list[dict]  # every epoch's metrics so far, this one last
    confusion: torch.Tensor  # the validation confusion matrix, summed over the workers, on the CPU
    examples: list  # (image, prediction, label) triples for the overlays: rank 0 only


def input_batches(cfg: TrainConfig, size, manifest: dict, rank: int, world: int, device: torch.device):
    """This worker's training and validation batches: augmented on the device (GPU default), or by
    albumentations in DataLoader workers (CPU default, and for users' own transforms).

    Each worker takes global // world images a step, so a step sees the same global batch (and the same
    learning rate applies) whether an elastic run has MIN or MAX workers; DDP's mean of the workers'
    gradients is then the gradient of the whole batch. Gradient accumulation was not chosen: it would
    change BatchNorm's batches and the step count per epoch with the worker count; TrainConfig instead asks
    for a global batch that every worker count of the range divides."""
    per_worker = cfg.batch_size // world
    if cfg.input == "device" or (cfg.input == "auto" and device.type == "cuda"):
        common = {"rank": rank, "world": world, "device": device, "manifest": manifest}
        common |= {"placement": cfg.device_placement, "budget_bytes": cfg.device_budget_bytes}
        common["log"] = functools.partial(print, flush=True) if rank == 0 else (lambda _: None)
        augment = {"augment": AugmentConfig(*size), "seed": cfg.seed, "drop_last": True}
        train = device_batches(cfg.data, "train", per_worker, size, **augment, **common)
        return train, device_batches(cfg.data, "val", per_worker, size, **common)
    transform = train_transform(AugmentConfig(*size), seed=cfg.seed, void=dataset_of(manifest).void_index)
    train_ds = ShardDataset(cfg.data, "train", transform, verify=False, manifest=manifest)
    loader = make_loader(
        train_ds, per_worker, True, cfg.seed, cfg.loader_workers, rank, world, drop_last=True
    )
    return loader, eval_loader(cfg.data, "val", size, per_worker, rank, world, manifest=manifest)


def init_weights_folder(cfg: TrainConfig) -> str:
    """Where the driver puts --init-from's model.pt and meta.json, for every worker to read."""
    return storage.join(cfg.storage_path, cfg.name, INIT_WEIGHTS)


def build_model_and_optimizer(cfg: TrainConfig, num_classes: int, device, world: int):
    """The run's model (from --init-from's weights where their shapes fit, else fresh or VGG16's encoder)
    and its SGD optimiser."""
    model = model_from_meta({"config": asdict(cfg), "num_classes": num_classes}, vgg16_weights=True)
    if cfg.init_from:
        ckpt_io.load_matching(init_weights_folder(cfg), model)
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
    that one is damaged, from the run's newest older checkpoint that verifies (with a warning); when Ray
    Train hands none, from the run folder's newest."""
    checkpoint = ray.train.get_checkpoint()
    run_dir = storage.join(cfg.storage_path, cfg.name)
    # None too when the run was stopped (SIGTERM, Ctrl-C) before Ray Train committed its only checkpoints:
    # the run folder still holds them
    kept = [storage.uri(checkpoint.filesystem, checkpoint.path)] if checkpoint else ckpt_io.find(run_dir)
    if not kept:
        return 0, []
    found = kept[-1]
    warn = functools.partial(print, flush=True) if rank == 0 else None
    try:
        used, meta = ckpt_io.restore_newest_good(found, run_dir, model, optimizer, warn)
    except SegNetError:
        if checkpoint:  # Ray Train committed it: losing it and every older one is an error
            raise
        # Ray Train committed none: what the folder holds is an upload cut short by the worker's death
        if warn:
            warn(f"warning: no checkpoint of {run_dir} is whole and Ray Train committed none: from epoch 1")
        return 0, []
    if rank == 0:
        print(
            f"resuming from the checkpoint of epoch {meta['epoch'] + 1} with {world} workers: {used}",
            flush=True,
        )
    return meta["epoch"] + 1, meta["history"]


def read_run_manifest(plan: WorkerPlan) -> dict:
    """The data's manifest, read once by each worker: the one the driver checked, or a clear error."""
    manifest, sha = read_manifest_and_id(plan.train.data)
    if sha != plan.manifest_sha256:
        raise SegNetError(
            f"{plan.train.data}/{MANIFEST} changed since run {plan.train.name} was planned: sha256 {sha}, "
            f"expected {plan.manifest_sha256}"
        )
    return manifest


def train_loop(config: dict) -> None:
    """Every worker runs this: prepare, then per epoch train, evaluate and report (rank 0 checkpoints).
    `config["plan"]` is the run's WorkerPlan."""
    import ray.train.torch

    plan: WorkerPlan = config["plan"]
    cfg = plan.train
    console.quiet_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True

    manifest = read_run_manifest(plan)
    classes = dataset_of(manifest).classes
    net, optimizer = build_model_and_optimizer(cfg, plan.num_classes, device, world)
    start, history = resume(net, optimizer, cfg, rank, world)
    if use_compile(cfg.compile, device):
        compile_model(net)
    model = ray.train.torch.prepare_model(net)  # DDP when world > 1; `net` stays the plain module
    loss_fn = segmentation_loss(plan.class_weights, ignore_index=plan.num_classes).to(device)  # void is K
    loader, val_loader = input_batches(cfg, plan.image_size, manifest, rank, world, device)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        getattr(getattr(loader, "sampler", loader), "set_epoch", lambda _: None)(epoch)
        images = len(loader) * (cfg.batch_size // world) * world
        with console.progress(images, f"epoch {epoch + 1}/{cfg.epochs}", rank == 0) as advance:
            args = (model, loader, loss_fn, optimizer, device, cfg.amp, cfg.channels_last)
            stats = train_epoch(*args, progress=lambda n: advance(n * world))
        keep = 3 if rank == 0 else 0  # examples for the plots, in every checkpoint (Tune may stop a trial)
        args = (net, val_loader, device, plan.num_classes, cfg.amp, cfg.channels_last, keep)
        meter, examples = evaluate(*args)
        meter.all_reduce()  # sums the confusion matrices and BF sums: each image counts once
        metrics = {"epoch": epoch, "workers": world, **stats, **scores(meter, classes)}
        metrics["epoch_time_s"] = time.perf_counter() - t0
        metrics[ENDED_AT] = int(time.time() * 1000)  # what MLflow stamps the epoch's points with
        history.append(metrics)  # every epoch's metrics: what MLflow lacks after an outage is logged from it
        report(plan, EpochResult(metrics, history, meter.matrix.cpu(), examples), net, optimizer)


def report(plan: WorkerPlan, result: EpochResult, net, optimizer) -> None:
    """One epoch's line, checkpoint (rank 0) and report to Ray Train. Each checkpoint holds the numbers of
    the run's plots (validation confusion matrix, example predictions), which the driver draws and logs."""
    cfg, m, epoch = plan.train, result.metrics, result.metrics["epoch"]
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        print(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {m['train_loss']:.4f}  "
            f"G {m['val_global_accuracy']:.3f}  C {m['val_class_accuracy']:.3f}  "
            f"mIoU {m['val_miou']:.3f}  BF {m['val_bf']:.3f}  "
            f"{m['train_images_per_s']:.1f} img/s/worker  {m['epoch_time_s']:.0f} s",
            flush=True,
        )
    with upload_folder(rank) as tmp:
        checkpoint = None
        if rank == 0:
            meta = {
                "config": asdict(cfg),
                "num_classes": plan.num_classes,
                "dataset": plan.dataset,
                "image_size": list(plan.image_size),
                "manifest_sha256": plan.manifest_sha256,
                "metrics": m,
                "history": result.history,
                "mlflow_run_id": plan.run_id,
            }
            ckpt_io.save(Path(tmp), net, optimizer, epoch, meta)
            ckpt_io.save_validation(Path(tmp), result.confusion, result.examples)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        finite = {k: v for k, v in m.items() if not isinstance(v, float) or math.isfinite(v)}
        ray.train.report(finite, checkpoint=checkpoint, checkpoint_upload_mode=UPLOAD)


@contextlib.contextmanager
def upload_folder(rank: int):
    """A local folder for rank 0's checkpoint, which Ray Train deletes once it has uploaded it in the
    background (UPLOAD); the other ranks' folders stay empty and go at once."""
    tmp = tempfile.mkdtemp(prefix="segnet-checkpoint-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank != 0:
        shutil.rmtree(tmp, ignore_errors=True)
