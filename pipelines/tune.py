"""`segnet tune`: a Ray Tune search over learning rate and class weighting, each trial a DDP training run,
then the best checkpoint evaluated on the test split and registered in MLflow.

Ray 2.60 runs Ray Train V2, where a Tuner cannot wrap a TorchTrainer: each trial is a function that fits
its own TorchTrainer and forwards the reports to Tune with TuneReportCallback (Ray's Train+Tune guide).
"""

import json
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from data_prep import storage
from data_prep.shards import init_ray, manifest_id
from pipelines import registry, tracking
from pipelines.evaluate import evaluate
from pipelines.train import METRICS, TrainConfig, check_config, train
from segnet.errors import SegNetError
from segnet.losses import WEIGHTING_MODES

SEARCH_FILE = "segnet_search.json"


@dataclass
class TuneConfig:
    data: str
    model: str = "segnet-basic"
    num_samples: int = 4
    epochs: int = 3
    lr_min: float = 1e-3
    lr_max: float = 0.1
    class_weighting: str = "none,median_frequency,inverse_frequency"
    scheduler: str = "asha"
    grace_period: int = 1
    max_concurrent: int = 2
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    batch_size: int = 12
    image_size: str | None = None
    metric: str = "val_miou"
    seed: int = 0
    loader_workers: int = 1
    compile: str = "auto"  # torch.compile: on GPU workers only (TrainConfig.compile)
    input: str = "auto"  # augmentation on the device for GPU workers (TrainConfig.input)
    max_failures: int = 0  # worker failures each trial's TorchTrainer recovers from (from its checkpoint)
    placement_timeout: float = 0  # seconds each trial waits for an autoscaler to add nodes
    register_as: str = "segnet-camvid"
    force_alias: bool = False
    storage_path: str = "runs"
    name: str | None = None
    mlflow_uri: str | None = None
    experiment: str = "segnet-camvid"
    address: str | None = None


def weighting_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in WEIGHTING_MODES]
    if not modes or bad:
        raise SegNetError(
            f"unknown class weighting {bad or text!r}; choose from: {', '.join(WEIGHTING_MODES)}"
        )
    return modes


def check_search(cfg: TuneConfig) -> None:
    if not 0 < cfg.lr_min < cfg.lr_max:
        raise SegNetError(f"--lr-min {cfg.lr_min} must be positive and below --lr-max {cfg.lr_max}")
    weighting_modes(cfg.class_weighting)
    if cfg.scheduler not in ("asha", "fifo"):
        raise SegNetError(f"unknown scheduler {cfg.scheduler!r}; choose asha or fifo")
    if cfg.metric not in METRICS:
        raise SegNetError(f"unknown metric {cfg.metric!r}; choose one of: {', '.join(METRICS)}")
    if cfg.num_samples < 1 or cfg.max_concurrent < 1:
        raise SegNetError("--num-samples and --max-concurrent must be at least 1")
    check_config(trial_config(cfg, cfg.lr_max, weighting_modes(cfg.class_weighting)[0], "check"))


def trial_config(
    cfg: TuneConfig, lr: float, weighting: str, name: str, model: str | None = None
) -> TrainConfig:
    shared = {f.name for f in fields(TrainConfig)} & set(asdict(cfg))
    base = {k: getattr(cfg, k) for k in shared}
    base.update(
        workers=cfg.workers_per_trial, lr=lr, class_weighting=weighting, name=name, keep_checkpoints=1,
        model=model or cfg.model,
    )  # fmt: skip
    return TrainConfig(**base)


def run_trial(config: dict) -> None:
    """One Tune trial: a whole Ray Train run whose per-epoch reports reach Tune (and its scheduler).
    A `model` in the trial's config (the Table 1 grid) overrides the search's model."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TuneConfig(**config["search"])
    name = f"{config['search_name']}-{ray.tune.get_context().get_trial_id()}"
    train_cfg = trial_config(cfg, config["lr"], config["class_weighting"], name, config.get("model"))
    train(train_cfg, parent_run_id=config["parent_run_id"], callbacks=[TuneReportCallback()])


def trainable():
    """`run_trial` asking Tune for no CPU: its TorchTrainer places the workers (Tune needs some resource,
    so a token of memory), leaving every CPU to them."""
    from ray import tune

    return tune.with_resources(run_trial, {"memory": 2**20})


def make_tuner(cfg: TuneConfig, name: str, param_space: dict, num_samples: int, scheduler=None, stop=None):
    """The one Tuner, shared by `segnet tune` and `segnet experiment table1`."""
    from ray import tune

    return tune.Tuner(
        trainable(),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode="max", num_samples=num_samples, scheduler=scheduler,
            max_concurrent_trials=cfg.max_concurrent,
        ),
        run_config=tune.RunConfig(name=name, storage_path=cfg.storage_path, stop=stop),
    )  # fmt: skip


def tune_search(cfg: TuneConfig, resume: str | None = None, log=print) -> dict:
    """Run (or resume) the search, then evaluate and register the best checkpoint."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    root = storage.absolute(cfg.storage_path)
    if resume:  # a search name under --storage-path, or the search's folder or URI
        path = storage.absolute(resume) if storage.is_uri(resume) or Path(resume).is_dir() else None
        path = path or storage.join(root, resume)
        if not storage.exists(storage.join(path, SEARCH_FILE)) or not tune.Tuner.can_restore(path):
            raise SegNetError(f"--resume {resume}: {path} holds no Ray Tune experiment to restore")
        saved = json.loads(storage.read_bytes(storage.join(path, SEARCH_FILE)))
        cfg = TuneConfig(**saved["config"])
        parent = saved["parent_run_id"]
        uri = tracking.tracking_uri(cfg.mlflow_uri)
        init_ray(cfg.address)
        root, name = path.rsplit("/", 1)
        log(f"resuming search {name}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(path, trainable=trainable(), resume_errored=True)
    else:
        check_search(cfg)
        uri = tracking.tracking_uri(cfg.mlflow_uri)
        # Trials run in other processes (and, on a cluster, other machines): give them absolute paths.
        cfg.mlflow_uri, cfg.data, cfg.storage_path = uri, storage.absolute(cfg.data), root
        name = cfg.name or f"search-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        init_ray(cfg.address)
        parent = tracking.start_run(uri, cfg.experiment, name, cfg, cfg.data, manifest_id(cfg.data))
        modes = weighting_modes(cfg.class_weighting)
        scheduler = (
            ASHAScheduler(max_t=cfg.epochs, grace_period=cfg.grace_period)
            if cfg.scheduler == "asha"
            else FIFOScheduler()
        )
        space = {"lr": ["loguniform", cfg.lr_min, cfg.lr_max], "class_weighting": modes}
        tracking.set_tags(uri, parent, {"search_space": json.dumps(space), "scheduler": cfg.scheduler})
        param_space = {
            "lr": tune.loguniform(cfg.lr_min, cfg.lr_max),
            "class_weighting": tune.choice(modes),
            "search": asdict(cfg),
            "search_name": name,
            "parent_run_id": parent,
        }
        tuner = make_tuner(cfg, name, param_space, cfg.num_samples, scheduler)
        saved = json.dumps({"config": asdict(cfg), "parent_run_id": parent}, indent=2)
        storage.write_bytes(storage.join(root, name, SEARCH_FILE), saved.encode())
    results = tuner.fit()
    if results.num_terminated + results.num_errors < cfg.num_samples:  # stopped by Ctrl-C or a signal
        raise SegNetError(
            f"search {name} was interrupted ({results.num_terminated} of {cfg.num_samples} trials finished); "
            f"nothing registered. Continue it with: segnet tune --resume {name} --storage-path {root}"
        )
    return finish_search(cfg, results, uri, parent, storage.join(root, name), log)


def finish_search(cfg: TuneConfig, results, uri: str, parent: str, path: str, log=print) -> dict:
    filesystem = storage.resolve(cfg.storage_path)[0]  # trials report checkpoint paths without a scheme
    rows = []
    for r in results:
        if r.metrics_dataframe is None or cfg.metric not in r.metrics_dataframe:
            continue
        df = r.metrics_dataframe.dropna(subset=[cfg.metric])
        best = df.loc[df[cfg.metric].idxmax()]
        rows.append({
            "trial": r.metrics.get("trial_id", Path(r.path).name),
            "lr": r.config["lr"],
            "class_weighting": r.config["class_weighting"],
            "epochs": int(df["epoch"].max()) + 1,
            cfg.metric: float(best[cfg.metric]),
            "checkpoint": storage.uri(filesystem, best.get("checkpoint_path")),
            "error": str(r.error).splitlines()[0] if r.error else "",
        })  # fmt: skip
    if not rows:
        raise SegNetError(f"no trial of search {path} reported {cfg.metric}")
    rows.sort(key=lambda r: r[cfg.metric], reverse=True)
    log(f"\n{'trial':<14} {'lr':>10} {'class weighting':<18} {'epochs':>6} {cfg.metric:>10}")
    for r in rows:
        score = r[cfg.metric]
        log(f"{r['trial']:<14} {r['lr']:>10.5f} {r['class_weighting']:<18} {r['epochs']:>6} {score:>10.4f}")
    best = rows[0]
    log(f"\nbest: lr {best['lr']:.5f}, {best['class_weighting']}: {cfg.metric} {best[cfg.metric]:.4f}")
    test = evaluate(best["checkpoint"], cfg.data, "test")
    metrics = {k: test[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")}
    log("test: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    meta = json.loads(storage.read_bytes(storage.join(best["checkpoint"], "meta.json")))
    tracking.log_metrics(uri, parent, {f"best_test_{k}": v for k, v in metrics.items()}, step=0)
    tracking.set_tags(uri, parent, {"best_trial": best["trial"], "best_lr": best["lr"],
                                    "best_class_weighting": best["class_weighting"],
                                    "best_checkpoint": best["checkpoint"]})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # the registry logs from a local copy of the checkpoint
        storage.copy_folder(best["checkpoint"], tmp)
        tracking.log_artifacts(uri, meta["mlflow_run_id"], Path(tmp) / "eval-test", "eval-test")
        reg = registry.register(
            uri, cfg.register_as, tmp, metrics, meta["manifest_sha256"], meta["mlflow_run_id"],
            cfg.force_alias, log, source=best["checkpoint"],
        )  # fmt: skip
    tracking.end_run(uri, parent)
    return {"search": str(path), "trials": rows, "best": best, "test": metrics, "registered": reg}
