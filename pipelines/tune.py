"""`segnet tune`: a Ray Tune search over learning rate and class weighting, each trial a DDP training run,
then the best checkpoint evaluated on the test split and registered in MLflow.

Ray 2.60 runs Ray Train V2, where a Tuner cannot wrap a TorchTrainer: each trial is a function that fits
its own TorchTrainer and forwards the reports to Tune with TuneReportCallback (Ray's Train+Tune guide).
"""

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from data_prep import storage
from data_prep.shards import init_ray, manifest_id
from pipelines import console, registry, tracking
from pipelines.config import TrainConfig, TuneConfig, build
from pipelines.evaluate import evaluate
from pipelines.train import check_config, train
from segnet.errors import SegNetError

SEARCH_FILE = "segnet_search.json"


def check_search(cfg: TuneConfig) -> None:
    """What depends on the data, for the trials' settings (TuneConfig checks its own values)."""
    check_config(trial_config(cfg, cfg.lr_max, cfg.class_weighting[0], "check"))


def trial_config(
    cfg: TuneConfig, lr: float, weighting: str, name: str, model: str | None = None
) -> TrainConfig:
    """One trial's TrainConfig: the search's train settings with the trial's sampled values."""
    return replace(cfg.train, lr=lr, class_weighting=weighting, name=name, model=model or cfg.train.model)


def run_trial(config: dict) -> None:
    """One Tune trial: a whole Ray Train run whose per-epoch reports reach Tune (and its scheduler).
    A `model` in the trial's config (the Table 1 grid) overrides the search's model."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = build(TuneConfig, config["search"])
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
            metric=cfg.train.metric,
            mode="max",
            num_samples=num_samples,
            scheduler=scheduler,
            max_concurrent_trials=cfg.max_concurrent,
        ),
        # Tune's status tables only with `segnet -v`: the trials' epoch lines and bars show progress.
        run_config=tune.RunConfig(
            name=name,
            storage_path=cfg.train.storage_path,
            stop=stop,
            verbose=1 if console.verbose() else 0,
            callbacks=[orphan_bars_callback()],
        ),
    )


def orphan_bars_callback():
    from ray import tune

    class OrphanBarsCallback(tune.Callback):
        """Every few seconds of the search, the bars of trials that Tune stopped mid-epoch are closed."""

        def __init__(self):
            self.last = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.last > 2:
                self.last = time.monotonic()
                console.close_orphan_bars()

        def on_experiment_end(self, trials, **info):
            console.close_orphan_bars()

    return OrphanBarsCallback()


def tune_search(cfg: TuneConfig, resume: str | None = None, log=print) -> dict:
    """Run (or resume) the search, then evaluate and register the best checkpoint."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    train_cfg = cfg.train
    root = storage.absolute(train_cfg.storage_path)
    if resume:  # a search name under storage_path, or the search's folder or URI
        path = storage.absolute(resume) if storage.is_uri(resume) or Path(resume).is_dir() else None
        path = path or storage.join(root, resume)
        if not storage.exists(storage.join(path, SEARCH_FILE)) or not tune.Tuner.can_restore(path):
            raise SegNetError(f"--resume {resume}: {path} holds no Ray Tune experiment to restore")
        saved = json.loads(storage.read_bytes(storage.join(path, SEARCH_FILE)))
        cfg = build(TuneConfig, saved["config"])
        parent = saved["parent_run_id"]
        uri = tracking.tracking_uri(cfg.train.mlflow_uri)
        init_ray(cfg.train.address)
        root, name = path.rsplit("/", 1)
        log(f"resuming search {name}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(path, trainable=trainable(), resume_errored=True)
    else:
        check_search(cfg)
        uri = tracking.tracking_uri(train_cfg.mlflow_uri)
        # Trials run in other processes (and, on a cluster, other machines): give them absolute paths.
        name = train_cfg.name or f"search-{train_cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = replace(
            cfg,
            train=replace(
                train_cfg, mlflow_uri=uri, data=storage.absolute(train_cfg.data), storage_path=root, name=name
            ),
        )
        init_ray(cfg.train.address)
        parent = tracking.start_run(
            uri, cfg.train.experiment, name, cfg, cfg.train.data, manifest_id(cfg.train.data)
        )
        modes = cfg.class_weighting
        scheduler = (
            ASHAScheduler(max_t=cfg.train.epochs, grace_period=cfg.grace_period)
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
    filesystem = storage.resolve(cfg.train.storage_path)[0]
    metric = cfg.train.metric  # trials report checkpoint paths without a scheme
    rows = []
    for r in results:
        if r.metrics_dataframe is None or metric not in r.metrics_dataframe:
            continue
        df = r.metrics_dataframe.dropna(subset=[metric])
        best = df.loc[df[metric].idxmax()]
        rows.append(
            {
                "trial": r.metrics.get("trial_id", Path(r.path).name),
                "lr": r.config["lr"],
                "class_weighting": r.config["class_weighting"],
                "epochs": int(df["epoch"].max()) + 1,
                metric: float(best[metric]),
                "checkpoint": storage.uri(filesystem, best.get("checkpoint_path")),
                "error": str(r.error).splitlines()[0] if r.error else "",
            }
        )
    if not rows:
        raise SegNetError(f"no trial of search {path} reported {metric}")
    rows.sort(key=lambda r: r[metric], reverse=True)
    log(f"\n{'trial':<14} {'lr':>10} {'class weighting':<18} {'epochs':>6} {metric:>10}")
    for r in rows:
        score = r[metric]
        log(f"{r['trial']:<14} {r['lr']:>10.5f} {r['class_weighting']:<18} {r['epochs']:>6} {score:>10.4f}")
    best = rows[0]
    log(f"\nbest: lr {best['lr']:.5f}, {best['class_weighting']}: {metric} {best[metric]:.4f}")
    test = evaluate(best["checkpoint"], cfg.train.data, "test")
    metrics = {k: test[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")}
    log("test: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    meta = json.loads(storage.read_bytes(storage.join(best["checkpoint"], "meta.json")))
    tracking.log_metrics(uri, parent, {f"best_test_{k}": v for k, v in metrics.items()}, step=0)
    tracking.set_tags(
        uri,
        parent,
        {
            "best_trial": best["trial"],
            "best_lr": best["lr"],
            "best_class_weighting": best["class_weighting"],
            "best_checkpoint": best["checkpoint"],
        },
    )
    with tempfile.TemporaryDirectory() as tmp:  # the registry logs from a local copy of the checkpoint
        storage.copy_folder(best["checkpoint"], tmp)
        tracking.log_artifacts(uri, meta["mlflow_run_id"], Path(tmp) / "eval-test", "eval-test")
        reg = registry.register(
            uri,
            cfg.register_as,
            tmp,
            metrics,
            meta["manifest_sha256"],
            meta["mlflow_run_id"],
            cfg.force_alias,
            log,
            source=best["checkpoint"],
        )
    tracking.end_run(uri, parent)
    return {"search": str(path), "trials": rows, "best": best, "test": metrics, "registered": reg}
