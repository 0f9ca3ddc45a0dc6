"""The `segnet` command: one argparse parser, one subcommand per pipeline step."""

import argparse
import json
import sys

from segnet.errors import SegNetError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the models with parameter counts and storage multipliers")
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SegNetError as e:
        print(f"segnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
