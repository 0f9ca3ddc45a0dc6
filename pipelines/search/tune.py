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
from data_prep.shards import dataset_of, init_ray, read_manifest_and_id
from pipelines.config import TuneConfig, build, named_for
from pipelines.core import console
from pipelines.core.checks import check_config
from pipelines.evaluate import evaluate
from pipelines.search.plan import close_trials, make_tuner, trainable, trial_config
from pipelines.tracking import registry, runs
from segnet.errors import SegNetError

SEARCH_FILE = "segnet_search.json"


def check_search(cfg: TuneConfig, manifest: dict | None = None) -> None:
    """What depends on the data, for the trials' settings (TuneConfig checks its own values); `manifest`:
    the data's, if the caller has read it."""
    check_config(trial_config(cfg, cfg.lr_max, cfg.class_weighting[0], "check"), manifest=manifest)


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
        uri = runs.tracking_uri(cfg.train.mlflow_uri)
        init_ray(cfg.train.address)
        root, name = path.rsplit("/", 1)
        log(f"resuming search {name}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(path, trainable=trainable(), resume_errored=True)
    else:
        manifest, sha = read_manifest_and_id(train_cfg.data)
        check_search(cfg, manifest)
        uri = runs.tracking_uri(train_cfg.mlflow_uri)
        name = train_cfg.name or f"search-{train_cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = resolved_search(cfg, manifest, uri, root, name)
        init_ray(cfg.train.address)
        parent = runs.start_run(uri, cfg.train.experiment, name, cfg, cfg.train.data, sha)
        modes = cfg.class_weighting
        scheduler = (
            ASHAScheduler(max_t=cfg.train.epochs, grace_period=cfg.grace_period)
            if cfg.scheduler == "asha"
            else FIFOScheduler()
        )
        space = {"lr": ["loguniform", cfg.lr_min, cfg.lr_max], "class_weighting": modes}
        runs.set_tags(uri, parent, {"search_space": json.dumps(space), "scheduler": cfg.scheduler})
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
    console.sigterm_as_ctrl_c()  # after ray.init (see console)
    results = tuner.fit()
    # stopped by Ctrl-C or SIGTERM (after which Tune may count the stopped trials as terminated)
    if console.SIGTERMED.is_set() or results.num_terminated + results.num_errors < cfg.num_samples:
        if console.SIGTERMED.is_set():  # Ray stopped first: its workers' last output comes before our line
            import ray

            ray.shutdown()
        raise SegNetError(
            f"search {name} was interrupted ({results.num_terminated} of {cfg.num_samples} trials finished); "
            f"nothing registered. Continue it with: segnet tune --resume {name} --storage-path {root}"
        )
    close_trials(cfg, name, results)
    return finish_search(cfg, results, uri, parent, storage.join(root, name), log)


def resolved_search(cfg: TuneConfig, manifest: dict, uri: str, root: str, name: str) -> TuneConfig:
    """The search as it runs and is logged: absolute paths (trials run in other processes and, on a cluster,
    other machines), its name, and the experiment and registered model named after the data's dataset
    when none is given."""
    named = named_for(dataset_of(manifest))
    train = replace(
        cfg.train,
        mlflow_uri=uri,
        data=storage.absolute(cfg.train.data),
        storage_path=root,
        name=name,
        experiment=cfg.train.experiment or named,
    )
    return replace(cfg, register_as=cfg.register_as or named, train=train)


def trial_rows(cfg: TuneConfig, results, path: str) -> list[dict]:
    """One row per trial that reported the metric: its sampled values, epochs, best score and that epoch's
    checkpoint; best first."""
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
    return rows


def held_out_split(data: str, log=print) -> str:
    """The split the best trial is scored and registered on: test, or val for data prepared without a test
    split (Cityscapes ships no test labels); the registry's test_* metrics then hold val's, as tagged."""
    if "test" in read_manifest_and_id(data)[0]["splits"]:
        return "test"
    log("the data has no test split: the best trial is scored and registered on val")
    return "val"


def finish_search(cfg: TuneConfig, results, uri: str, parent: str, path: str, log=print) -> dict:
    """The trials ranked by their best epoch's metric, the best one evaluated on the held-out split
    (`held_out_split`) and registered; the search's MLflow run ended."""
    metric = cfg.train.metric
    rows = trial_rows(cfg, results, path)
    log(f"\n{'trial':<14} {'lr':>10} {'class weighting':<18} {'epochs':>6} {metric:>10}")
    for r in rows:
        score = r[metric]
        log(f"{r['trial']:<14} {r['lr']:>10.5f} {r['class_weighting']:<18} {r['epochs']:>6} {score:>10.4f}")
    best = rows[0]
    log(f"\nbest: lr {best['lr']:.5f}, {best['class_weighting']}: {metric} {best[metric]:.4f}")
    split = held_out_split(cfg.train.data, log)
    test = evaluate(best["checkpoint"], cfg.train.data, split)
    metrics = {k: test[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")}
    log(f"{split}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    meta = json.loads(storage.read_bytes(storage.join(best["checkpoint"], "meta.json")))
    runs.log_metrics(uri, parent, {f"best_test_{k}": v for k, v in metrics.items()}, step=0)
    runs.set_tags(
        uri,
        parent,
        {
            "best_trial": best["trial"],
            "best_lr": best["lr"],
            "best_class_weighting": best["class_weighting"],
            "best_checkpoint": best["checkpoint"],
            "scored_on": split,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:  # the registry logs from a local copy of the checkpoint
        storage.copy_folder(best["checkpoint"], tmp)
        runs.log_artifacts(uri, meta["mlflow_run_id"], Path(tmp) / f"eval-{split}", f"eval-{split}")
        reg = registry.register(
            uri,
            cfg.register_as or named_for(dataset_of(meta, "meta.json")),
            tmp,
            metrics,
            meta["manifest_sha256"],
            meta["mlflow_run_id"],
            cfg.force_alias,
            log,
            source=best["checkpoint"],
            search_run_id=parent,
        )
    runs.end_run(uri, parent)
    return {
        "search": str(path),
        "parent_run_id": parent,
        "trials": rows,
        "best": best,
        "scored_on": split,
        "test": metrics,
        "registered": reg,
    }
