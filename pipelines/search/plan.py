"""What `segnet tune` and `segnet experiment table1` share: a trial's TrainConfig, the trial that fits one
TorchTrainer, the one Tuner, and the end of each trial's MLflow run.

Ray 2.60 runs Ray Train V2, where a Tuner cannot wrap a TorchTrainer: each trial is a function that fits
its own TorchTrainer and forwards the reports to Tune with TuneReportCallback (Ray's Train+Tune guide).
"""

import math
import time
from dataclasses import replace

from data_prep import storage
from pipelines.config import TrainConfig, TuneConfig, build
from pipelines.core import checkpoint as ckpt_io
from pipelines.core import console
from pipelines.train.driver import close_run, train


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
    name = trial_name(config["search_name"], ray.tune.get_context().get_trial_id())
    train_cfg = trial_config(cfg, config["lr"], config["class_weighting"], name, config.get("model"))
    if not report_finished_run(train_cfg):
        train(train_cfg, parent_run_id=config["parent_run_id"], callbacks=[TuneReportCallback()])


def report_finished_run(cfg: TrainConfig) -> bool:
    """A trial restored by `segnet tune --resume` whose run had trained every epoch (the search was stopped
    after the run's end, before Tune recorded it): its last epoch is reported to Tune again, with its
    checkpoint, and nothing is trained. False for a run with epochs to go."""
    import ray.tune

    kept = [c for c in ckpt_io.find(storage.join(cfg.storage_path, cfg.name)) if ckpt_io.verifies(c)]
    meta = ckpt_io.read_meta(kept[-1]) if kept else {"epoch": -1}
    if meta["epoch"] + 1 < cfg.epochs:
        return False
    finite = {k: v for k, v in meta["metrics"].items() if not isinstance(v, float) or math.isfinite(v)}
    ray.tune.report({**finite, "checkpoint_path": storage.resolve(kept[-1])[1]})  # as TuneReportCallback
    return True


def trial_name(search_name: str, trial_id: str) -> str:
    """A trial's training run: its name, and its folder under the search's storage path."""
    return f"{search_name}-{trial_id}"


def close_trials(cfg: TuneConfig, search_name: str, results) -> None:
    """Every trial's MLflow run ended, with its plots and best checkpoint (`close_run`): Tune stops a trial
    (ASHA at a rung, or at its last epoch) before the trial records its run's end, and a failed trial's run
    is ended FAILED with its error."""
    for r in results:
        error = (str(r.error).splitlines() or [type(r.error).__name__])[0] if r.error else ""
        close_run(storage.join(cfg.train.storage_path, trial_name(search_name, r.metrics["trial_id"])), error)


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
