"""`make gpu-table1`: the paper's Table 1 from the project's own code, in one call to a GPU machine.

Eight decoder variants at 360x480 with the paper's recipe (SGD lr 0.1, momentum 0.9, batch 12, weight decay
5e-4 as `segnet train`'s default), each for an equal share of a time budget (420 s by default, the load
included, so the whole command fits one 600 s device call). Each variant's checkpoint of best validation
global accuracy is scored on the test split (G, C, mIoU, BF). It uses the project's engine
(`pipelines/core/engine.py`), models, device input path (`data_prep/device_augment.py`, the split resident
on the device and augmented there) and metrics, on the compact CamVid copy of `make camvid-compact`; no Ray,
MLflow or albumentations. bf16 autocast on a GPU; torch.compile only with `--compile on`: compiling each
variant's training and evaluation graphs would take much of its ~50 s share.

Each variant's row is written to OUT/rows/ the moment it finishes (temporary name, then rename), so a call
cut off keeps what it did, and a later call skips the rows already there. The report (OUT/report/table1.md,
.csv, .json) is the one `segnet experiment table1` writes, over every row in OUT/rows/: `--balancing none`
in a second call adds the natural-frequency rows, and the report then checks all three conclusions.
`--tiny` is the dry run the test suite uses on a CPU: the same code, tiny sizes.
"""

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from data_prep.compact import label_weights, read_compact
from data_prep.datasets import CAMVID  # the compact copy is CamVid's
from data_prep.device_augment import AugmentConfig, DeviceBatches
from pipelines.config import TABLE1_BALANCING
from pipelines.core import engine
from pipelines.core.table1 import inference_ms, write_report
from segnet import build_model, segmentation_loss
from segnet.paper import PAPER_TABLE1

START = time.monotonic()  # the budget counts from the process start: imports and the load are in it
VARIANTS = list(PAPER_TABLE1)
REPORT_RESERVE_S = 10  # kept back from the variants' shares for the report


def load_splits(data, device, size, batch: int, tiny: bool) -> dict:
    """The three splits of the compact copy, resident on the device: training shuffled and augmented there,
    validation and test in order at full label resolution. `tiny`: 8 images of each, cut to their top-left
    96x128 corner, so the dry run scores small labels."""
    splits = {s: read_compact(data, s, 8 if tiny else None) for s in ("train", "val", "test")}
    if tiny:
        splits = {s: (images[:, :96, :128], labels[:, :96, :128]) for s, (images, labels) in splits.items()}
    return {
        "train_labels": splits["train"][1],
        "train": DeviceBatches(*splits["train"], batch, size, augment=AugmentConfig(*size), drop_last=True,
                               device=device, void=CAMVID.void_index),
        "val": DeviceBatches(*splits["val"], batch, size, device=device),
        "test": DeviceBatches(*splits["test"], batch, size, device=device),
    }  # fmt: skip


def scored(model, batches, device, amp: bool) -> tuple[dict, float]:
    """(G, C, mIoU, BF of the model on the batches, seconds it took)."""
    t0 = time.perf_counter()
    meter, _ = engine.evaluate(model, batches, device, CAMVID.num_classes, amp=amp, channels_last=True)
    return meter.compute(), time.perf_counter() - t0


def train_variant(
    name: str, splits: dict, weights, device, seconds: float, settings: dict, log=print
) -> dict:
    """One variant trained for about `seconds` (at least one epoch), validated after each epoch; the state of
    best validation global accuracy is kept on the device and scored on the test split at the end."""
    torch.manual_seed(0)
    model = build_model(name, CAMVID.num_classes).to(device).to(memory_format=torch.channels_last)
    if settings["compile"]:
        engine.compile_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = segmentation_loss(weights, ignore_index=CAMVID.void_index).to(device)
    amp, train = settings["amp"], splits["train"]
    test_share = len(splits["test"].images) / max(len(splits["val"].images), 1)
    t0, epoch, best, history = time.perf_counter(), 0, None, []
    while True:
        e0 = time.perf_counter()
        train.set_epoch(epoch)
        stats = engine.train_epoch(model, train, loss_fn, optimizer, device, amp=amp, channels_last=True)
        val, val_s = scored(model, splits["val"], device, amp)
        history.append({"epoch": epoch, **stats, "val_global_accuracy": val["global_accuracy"]})
        if best is None or val["global_accuracy"] > best["val_G"]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch, "val_G": val["global_accuracy"], "state": state}
        epoch += 1
        elapsed, epoch_s = time.perf_counter() - t0, time.perf_counter() - e0
        if elapsed + epoch_s + val_s * test_share > seconds:  # another epoch would overrun the share
            break
    train_s = time.perf_counter() - t0
    model.load_state_dict(best["state"])
    test, _ = scored(model, splits["test"], device, amp)
    last = history[-1]
    log(
        f"  {name}: {epoch} epochs in {train_s:.0f} s ({last['train_images_per_s']:.0f} img/s), best "
        f"epoch {best['epoch'] + 1} (val G {best['val_G']:.3f}); test G {test['global_accuracy']:.3f}, "
        f"mIoU {test['miou']:.3f}, BF {test['bf']:.3f}"
    )
    return {
        "variant": name,
        "epochs": epoch,
        "best_epoch": best["epoch"] + 1,
        "train_seconds": train_s,
        "images_per_s": last["train_images_per_s"],
        "val_G": 100 * best["val_G"],
        "G": 100 * test["global_accuracy"],
        "C": 100 * test["class_accuracy"],
        "mIoU": 100 * test["miou"],
        "BF": 100 * test["bf"],
        "history": history,
    }


def save_row(rows: Path, row: dict) -> Path:
    """rows/VARIANT-BALANCING.json, written under a temporary name and renamed, so it is whole or absent."""
    path = rows / f"{row['variant']}-{row['balancing']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, path)
    return path


def read_rows(rows: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(rows.glob("*.json"))]


def report(out: Path, settings: dict, info: dict) -> Path:
    """OUT/report/: Table 1 over every row in OUT/rows/ (from this call and earlier ones)."""
    rows = read_rows(out / "rows")
    info = {**info, "training": describe(settings, rows)}
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    modes = [m for m in TABLE1_BALANCING if any(r["balancing"] == m for r in rows)]
    infer = {r["variant"]: r["infer_ms"] for r in rows}
    devices = sorted({r["device"] for r in rows})
    info = {**info, "machine": ", ".join(devices), "test_images": rows[0]["test_images"] if rows else 0}
    return write_report(rows, variants, modes, infer, info, out / "report")


def settings_for(args, device) -> dict:
    cuda = device.type == "cuda"
    size, batch = ((48, 64), 2) if args.tiny else ((360, 480), 12)
    return {
        "size": size,
        "batch": batch,
        "amp": cuda,  # bf16 autocast on a GPU; a CPU dry run stays fp32
        "compile": args.compile == "on",
        "infer_steps": 1 if args.tiny else 10,
    }


def describe(settings: dict, rows: list[dict]) -> str:
    """The training phrase of the report: the time budgets, the recipe and what made each second count."""
    budgets = ", ".join(
        f"{TABLE1_BALANCING[m]} {sum(r['budget_s'] for r in rs) / len(rs):.0f} s"
        for m in TABLE1_BALANCING
        if (rs := [r for r in rows if r["balancing"] == m])
    )
    return (
        f"for an equal time budget per variant ({budgets}; one call per balancing mode), SGD lr 0.1, "
        f"momentum 0.9, weight decay 5e-4, batch {settings['batch']}, "
        f"{'bf16 autocast' if settings['amp'] else 'fp32'}, "
        f"{'torch.compile' if settings['compile'] else 'eager (not compiled)'}, channels_last, the splits "
        "resident on the device and augmented there"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-table1", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=".gpu/camvid", help="compact CamVid (python -m data_prep.compact)")
    parser.add_argument("--out", default="gpu-table1")
    parser.add_argument("--balancing", choices=list(TABLE1_BALANCING), default="median_frequency")
    parser.add_argument("--budget-s", type=float, default=420, help="the whole call, load included")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--compile", choices=("on", "off"), default="off", help="torch.compile each variant")
    parser.add_argument("--tiny", action="store_true", help="dry run: tiny sizes, one epoch each, any device")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu {platform.machine()}"
    settings = settings_for(args, device)
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    print(f"gpu-table1 on {name}: loading {args.data}", flush=True)
    splits = load_splits(args.data, device, settings["size"], settings["batch"], args.tiny)
    weights = label_weights(splits["train_labels"], CAMVID.num_classes, args.balancing)
    done = {(r["variant"], r["balancing"]) for r in read_rows(out / "rows")}
    todo = [v for v in args.variants if (v, args.balancing) not in done]
    print(f"  loaded in {time.monotonic() - START:.0f} s; {len(todo)} variants to train", flush=True)
    for i, variant in enumerate(todo):
        left = START + args.budget_s - REPORT_RESERVE_S - time.monotonic()
        share = 0.0 if args.tiny else max(left / (len(todo) - i), 0.0)
        row = train_variant(variant, splits, weights, device, share, settings)
        size = settings["size"]
        row.update(
            balancing=args.balancing,
            budget_s=share,
            infer_ms=inference_ms(variant, size, settings["infer_steps"], device.type),
            device=name,
            test_images=len(splits["test"].images),
            date=dt.date.today().isoformat(),
            torch=torch.__version__,
            amp=settings["amp"],
            compiled=settings["compile"],
        )
        save_row(out / "rows", row)
    info = {
        "profile": "gpu-table1",
        "image_size": "x".join(map(str, settings["size"])),
        "infer_size": "x".join(map(str, settings["size"])) + " (fp32, batch norm folded)",
        "run": f"`make gpu-table1` (no Ray, no MLflow; torch {torch.__version__})",
        "minutes": (time.monotonic() - START) / 60,
        "date": dt.date.today().isoformat(),
    }
    folder = report(out, settings, info)
    print((folder / "table1.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
