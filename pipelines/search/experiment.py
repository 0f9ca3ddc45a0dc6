"""`segnet experiment table1`: the paper's decoder comparison (Table 1), rerun as one Ray Tune grid and
reported next to the paper's figures, with the paper's three conclusions checked on our numbers."""

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from data_prep import storage
from data_prep.augment import parse_size
from data_prep.download import find_camvid
from data_prep.shards import dataset_of, init_ray, manifest_id, prepare, read_manifest
from pipelines.config import Table1Config, named_for
from pipelines.core.checks import check_config, check_resources
from pipelines.core.table1 import inference_ms, write_report
from pipelines.evaluate import evaluate
from pipelines.search.plan import close_trials, make_tuner, trial_config
from pipelines.tracking import runs
from segnet.errors import SegNetError


def run_table1(cfg: Table1Config, log=print) -> dict:
    """Train the grid (variants x balancing) as one Tune experiment, test every trial, write the report."""
    t0 = time.perf_counter()
    train_cfg, search, lr = prepare_grid(cfg)
    uri, name = train_cfg.mlflow_uri, train_cfg.name
    parent = runs.start_run(uri, train_cfg.experiment, name, cfg, train_cfg.data, manifest_id(train_cfg.data))
    runs.set_tags(uri, parent, {"label": cfg.label, "recipe": json.dumps(asdict(search))})
    log(
        f"Table 1 ({cfg.label}): {len(cfg.variants)} variants x {len(search.class_weighting)} "
        f"balancing modes at {train_cfg.image_size}, {train_cfg.epochs} epochs; MLflow experiment "
        f"{train_cfg.experiment!r}"
    )
    results = fit_grid(cfg, search, lr, parent)
    if results.num_terminated + results.num_errors < len(cfg.variants) * len(search.class_weighting):
        runs.end_run(uri, parent, "KILLED")
        raise SegNetError(f"experiment {name} was interrupted; no report written")
    close_trials(search, name, results)
    infer = {v: inference_ms(v, parse_size(cfg.infer_size), cfg.infer_steps) for v in cfg.variants}
    rows = score_trials(results, train_cfg, parent)
    info = {
        "profile": cfg.label,
        "image_size": train_cfg.image_size,
        "training": f"for {train_cfg.epochs} epochs per trial ({train_cfg.workers} worker(s) each)",
        "epochs": train_cfg.epochs,
        "infer_size": cfg.infer_size,
        "minutes": (time.perf_counter() - t0) / 60,
        "name": name,
        "run": f"Ray Tune experiment `{name}`",
        "workers_per_trial": train_cfg.workers,
        "test_images": read_manifest(train_cfg.data)["splits"]["test"]["num_images"],
    }
    out = storage.absolute(cfg.out)
    with tempfile.TemporaryDirectory() as tmp:  # a bucket gets a copy of the report written here
        folder = Path(tmp if storage.is_uri(out) else out)
        report = write_report(rows, cfg.variants, search.class_weighting, infer, info, folder)
        runs.log_artifacts(uri, parent, report, "table1")
        if storage.is_uri(out):
            storage.copy_folder(report, out)
    runs.end_run(uri, parent)
    log(f"Table 1 report: {out}/table1.md ({info['minutes']:.1f} minutes)")
    return {"rows": rows, "out": out, "minutes": info["minutes"], "parent_run_id": parent}


def prepare_grid(cfg: Table1Config):
    """(train config, search config, lr): the data made on first use, every mistake found before the
    trials start (the data, each variant's image size, the cluster's resources), paths made absolute."""
    modes, train_cfg = cfg.tune.class_weighting, cfg.tune.train
    if not storage.exists(storage.join(train_cfg.data, "manifest.json")):
        prepare(find_camvid(cfg.source), train_cfg.data)
    lr = cfg.tune.lr_max  # the paper's recipe fixes it (lr_min = lr_max in configs/table1-*.yaml)
    for v in cfg.variants:
        check_config(trial_config(cfg.tune, lr, modes[0], "check", v))
    train_cfg = replace(
        train_cfg,
        mlflow_uri=runs.tracking_uri(train_cfg.mlflow_uri),
        data=storage.absolute(train_cfg.data),
        storage_path=storage.absolute(train_cfg.storage_path),
        name=train_cfg.name or f"table1-{cfg.label}-{time.strftime('%Y%m%d-%H%M%S')}",
        experiment=train_cfg.experiment or named_for(dataset_of(read_manifest(train_cfg.data))),
    )
    search = replace(cfg.tune, train=train_cfg, num_samples=1)
    init_ray(train_cfg.address)
    check_resources(trial_config(search, lr, modes[0], "check"))  # e.g. the paper profile without GPUs
    return train_cfg, search, lr


def fit_grid(cfg: Table1Config, search, lr: float, parent: str):
    """The grid (variants x balancing modes) as one Ray Tune experiment; its results."""
    from ray import tune
    from ray.tune.stopper import TrialPlateauStopper

    param_space = {
        "model": tune.grid_search(cfg.variants),
        "class_weighting": tune.grid_search(search.class_weighting),
        "lr": lr,
        "search": asdict(search),
        "search_name": search.train.name,
        "parent_run_id": parent,
    }
    stop = (
        TrialPlateauStopper("train_loss", std=0.002, num_results=10, grace_period=50, mode="min")
        if cfg.converge
        else None
    )
    return make_tuner(search, search.train.name, param_space, 1, stop=stop).fit()


def score_trials(results, train_cfg, parent: str) -> list[dict]:
    """Each trial's checkpoint of best validation global accuracy, scored on the test split and logged to
    the trial's MLflow run: the report's rows."""
    uri = train_cfg.mlflow_uri
    filesystem = storage.resolve(train_cfg.storage_path)[0]  # trials report checkpoint paths without a scheme
    rows = []
    for r in results:
        model, mode = r.config["model"], r.config["class_weighting"]
        df = None if r.metrics_dataframe is None else r.metrics_dataframe.dropna(subset=[train_cfg.metric])
        if r.error or df is None or df.empty:
            runs.end_run(uri, parent, "FAILED")
            raise SegNetError(f"trial {model} / {mode} failed: {str(r.error).splitlines()[0]}")
        best = df.loc[df[train_cfg.metric].idxmax()]
        checkpoint = storage.uri(filesystem, best["checkpoint_path"])
        test = evaluate(checkpoint, train_cfg.data, "test")
        run_id = json.loads(storage.read_bytes(storage.join(checkpoint, "meta.json")))["mlflow_run_id"]
        scores = {f"test_{k}": test[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")}
        runs.log_metrics(uri, run_id, scores, step=0)
        rows.append(
            {
                "variant": model,
                "balancing": mode,
                "epochs": int(df["epoch"].max()) + 1,
                "best_epoch": int(best["epoch"]) + 1,
                "val_G": 100 * float(best[train_cfg.metric]),
                "G": 100 * test["global_accuracy"],
                "C": 100 * test["class_accuracy"],
                "mIoU": 100 * test["miou"],
                "BF": 100 * test["bf"],
                "mlflow_run_id": run_id,
                "checkpoint": checkpoint,
            }
        )
    return rows
