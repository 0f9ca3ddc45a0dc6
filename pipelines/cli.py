"""The `segnet` command: a table of subcommands, each read from one config class of pipelines/config.py.

Every subcommand takes `--config FILE.yaml` (any of its settings; profiles are in configs/) and
`--print-config` (its settings as YAML that `--config` reads back). `--batch-size 6`, `--amp`, `--no-amp`,
`--epochs 2` for a search's `--train.epochs` and lists as `a,b` all work (pipelines/arguments.py). With
`--json`, stdout holds only the JSON document. `-v` shows Ray's and MLflow's own log lines.
"""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import NamedTuple

from jsonargparse import ArgumentError

from pipelines import arguments
from pipelines import config as c
from pipelines.core import console
from segnet.errors import SegNetError


def cmd_models(cfg: c.ModelsConfig):
    from segnet.models import model_summary, summary_table

    rows = model_summary(num_classes=cfg.num_classes)
    return rows, summary_table(rows)


def cmd_prepare(cfg: c.PrepareConfig):
    from data_prep.shards import prepare

    prepare(**asdict(cfg))


def cmd_download(cfg: c.DownloadConfig):
    from data_prep.download import download

    download(**asdict(cfg))


def cmd_train(cfg: c.TrainCommand):
    from pipelines.train.driver import train

    best = train(c.part(c.TrainConfig, cfg), resume=cfg.resume, num_classes=cfg.num_classes)
    scores = "  ".join(f"{k} {v:.4f}" for k, v in best["best_metrics"].items())
    return best, (
        f"best epoch {best['best_epoch']} of run {best['run']} (by {best['metric']}): {scores}\n"
        f"checkpoint {best['best_checkpoint']}\nMLflow run {best['mlflow_run_id']} in {c.tracking_uri(cfg)}"
    )


def cmd_tune(cfg: c.TuneCommand):
    from pipelines.search.tune import tune_search

    found = tune_search(c.part(c.TuneConfig, cfg), resume=cfg.resume)
    scores, reg = "  ".join(f"{k} {v:.4f}" for k, v in found["test"].items()), found["registered"]
    text = f"search {found['search']}\ntest: {scores}\nregistered {reg['name']} v{reg['version']}"
    return {k: found[k] for k in ("search", "test", "registered")}, text


def cmd_run(cfg: c.RunConfig):
    from pipelines.search.run import run

    run(cfg)


def cmd_table1(cfg: c.Table1Config):
    from data_prep import storage
    from pipelines.search.experiment import run_table1

    print(storage.read_bytes(storage.join(run_table1(cfg)["out"], "table1.md")).decode())


def cmd_evaluate(cfg: c.EvaluateConfig):
    from pipelines.core.engine import format_scores
    from pipelines.evaluate import evaluate, evaluate_registered

    options = {k: getattr(cfg, k) for k in ("split", "out", "batch_size", "compile", *c.MC_SETTINGS)}
    if cfg.model_uri:
        result = evaluate_registered(c.tracking_uri(cfg), cfg.model_uri, cfg.data, **options)
    else:
        result = evaluate(cfg.checkpoint, cfg.data, **options)
    return result, f"{format_scores(result)}\nconfusion matrix and overlays in {result['out']}"


def cmd_registry_list(cfg: c.RegistryListConfig):
    from pipelines.tracking import registry

    rows = registry.list_models(c.tracking_uri(cfg))
    text = [f"no registered models in {c.tracking_uri(cfg)}"] if not rows else []
    for r in rows:
        aliases = ", ".join(f"@{alias}=v{v}" for alias, v in r["aliases"].items())
        text.append(f"{r['name']:<24} versions {','.join(r['versions']):<8} {aliases}")
    return rows, "\n".join(text)


def cmd_registry_show(cfg: c.RegistryShowConfig):
    from pipelines.tracking import registry
    from pipelines.tracking.runs import flatten

    info = registry.show(c.tracking_uri(cfg), cfg.ref)
    return info, console.lines(flatten(info))


def cmd_registry_promote(cfg: c.RegistryPromoteConfig):
    from pipelines.tracking import registry

    return registry.promote(c.tracking_uri(cfg), cfg.name, cfg.version)


def cmd_predict(cfg: c.PredictConfig) -> int:
    from pipelines.predict import predict

    mc = {k: getattr(cfg, k) for k in c.MC_SETTINGS}
    job = predict(c.tracking_uri(cfg), cfg.model, cfg.input, cfg.output, cfg.overlay, cfg.max_pixels, **mc)
    return 1 if job["skipped"] else 0


def cmd_serve(cfg: c.ServeConfig):
    from pipelines.serve import serving

    with serving(cfg) as url:
        print(f"try: curl -s --data-binary @IMAGE.png -H 'Content-Type: image/png' {url}/predict?format=json")
        while True:  # until Ctrl-C; serving() then shuts Serve down
            time.sleep(3600)


def cmd_export(cfg: c.ExportConfig):
    from pipelines.export import export_onnx

    return export_onnx(c.tracking_uri(cfg), cfg.model, cfg.out, cfg.source, cfg.images)


def cmd_submit(cfg: c.SubmitConfig) -> int:
    from pipelines.submit import submit

    return submit(cfg.address, cfg.step, cfg.storage, wait=cfg.wait)


def cmd_bench_data(cfg: c.BenchDataConfig):
    from data_prep.augment import parse_size
    from pipelines.bench.bench import bench_data

    return bench_data(cfg.data, cfg.source, cfg.split, cfg.samples, parse_size(cfg.image_size), cfg.loaders)


def cmd_bench_storage(cfg: c.BenchStorageConfig):
    from pipelines.bench.bench import bench_storage

    return bench_storage(cfg.data, cfg.split)


def cmd_bench_train(cfg: c.BenchTrainConfig):
    from data_prep.augment import parse_size
    from pipelines.bench.bench import bench_train

    return bench_train(cfg.data, cfg.model, parse_size(cfg.image_size), cfg.batch_size, cfg.epochs, cfg.cpus)


def cmd_bench_model(cfg: c.BenchModelConfig):
    from data_prep.augment import parse_size
    from pipelines.bench.bench import bench_model

    size, options = parse_size(cfg.image_size), ("recompute", "amp", "compile", "compile_mode")
    args = (cfg.model, size, cfg.batch_size, cfg.mode, cfg.steps, cfg.baseline, cfg.channels_last)
    return bench_model(*args, **{k: getattr(cfg, k) for k in options})


def cmd_bench_scale(cfg: c.BenchScaleConfig):
    from pipelines.bench.scale import bench_scale

    return {"sizes": bench_scale(cfg.source, cfg.out, cfg.factors, cfg.workers, cfg.keep, cfg.read_seconds)}


def cmd_bench_serve(cfg: c.BenchServeConfig):
    from pipelines.bench.bench import bench_serve

    return bench_serve(cfg.url, cfg.image, cfg.clients, cfg.requests, cfg.plot, cfg, cfg.duration, cfg.rate)


class Command(NamedTuple):
    config: type  # its settings; the first line of its docstring is the command's help
    run: Callable  # config -> None, an exit status, the --json document, or (document, a person's summary)
    positional: str | tuple[str, ...] | None = None  # what bare arguments set: `serve MODEL`, `promote N V`
    profile: str | None = None  # the config file read first: a profile in configs/


COMMANDS = {
    "models": Command(c.ModelsConfig, cmd_models),
    "prepare": Command(c.PrepareConfig, cmd_prepare),
    "train": Command(c.TrainCommand, cmd_train),
    "evaluate": Command(c.EvaluateConfig, cmd_evaluate),
    "tune": Command(c.TuneCommand, cmd_tune),
    "registry list": Command(c.RegistryListConfig, cmd_registry_list),
    "registry show": Command(c.RegistryShowConfig, cmd_registry_show, "ref"),
    "registry promote": Command(c.RegistryPromoteConfig, cmd_registry_promote, ("name", "version")),
    "predict": Command(c.PredictConfig, cmd_predict),
    "serve": Command(c.ServeConfig, cmd_serve, "model"),
    "export": Command(c.ExportConfig, cmd_export, "model"),
    "run": Command(c.RunConfig, cmd_run, profile=f"{c.CONFIGS}/small.yaml"),
    "submit": Command(c.SubmitConfig, cmd_submit),
    "experiment table1": Command(c.Table1Config, cmd_table1, profile=f"{c.CONFIGS}/table1-cpu.yaml"),
    "data download": Command(c.DownloadConfig, cmd_download),
    "bench data": Command(c.BenchDataConfig, cmd_bench_data),
    "bench storage": Command(c.BenchStorageConfig, cmd_bench_storage),
    "bench train": Command(c.BenchTrainConfig, cmd_bench_train),
    "bench model": Command(c.BenchModelConfig, cmd_bench_model),
    "bench scale": Command(c.BenchScaleConfig, cmd_bench_scale),
    "bench serve": Command(c.BenchServeConfig, cmd_bench_serve),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    step = argv[argv.index("--") + 1 :] if "--" in argv else []  # `submit -- STEP`: passed on untouched
    argv = argv[: argv.index("--")] if "--" in argv else argv
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[:1] or [""])[0]
    if name not in COMMANDS:
        asked, configs = argv[:1] in (["-h"], ["--help"]), {n: cmd.config for n, cmd in COMMANDS.items()}
        print(arguments.usage(__doc__, configs), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    console.setup(verbose)
    command = COMMANDS[name]
    try:
        parser = arguments.build_parser(command.config, f"segnet {name}", command.profile)
        args = parser.parse_args(
            arguments.normalize(argv[len(name.split()) :], command.config, command.positional)
        )
        cfg = c.build(command.config, {**args.as_dict(), **({"step": step} if step else {})})
        with console.json_only(getattr(cfg, "json", False)):
            result = command.run(cfg)
    except (ArgumentError, SegNetError) as e:  # the message names the key, file or value: on one line
        print(f"segnet {name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segnet {name}: interrupted", file=sys.stderr)
        return 130
    if result is not None and not isinstance(result, int):
        document, text = result if isinstance(result, tuple) else (result, console.lines(result))
        print(json.dumps(document, indent=2, default=str) if cfg.json else text)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
