"""`make gpu-check`: what a GPU machine says about this project, in one command, in under 8 minutes.

It runs the project's own step, input path and metric code without Ray, MLflow or albumentations (the GPU
machines have torch, numpy, pillow, pyarrow and scipy, and no network), on the compact CamVid copy that
`python -m data_prep.compact` makes (images re-encoded as JPEG q95, labels exact). It writes
OUT/gpu-check.json and OUT/gpu-check.md:

1. training-step rows (segnet, bf16 and fp32): the plain reference in NCHW and channels_last, ours eager and
   compiled, against the best-of-bursts matmul rate measured before and after;
2. the device-side input path's augmented samples/s, and the JPEG decode rate per CPU core;
3. BF on the device against the scipy BF on the CPU, on real CamVid test labels;
4. a short real training of segnet-basic at 360x480 (device input path) with test G, C, mIoU and BF.

`--tiny` is the dry run the test suite uses on a CPU: the same code, tiny sizes.
"""

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.compact import label_weights, read_compact
from data_prep.datasets import CAMVID  # the compact copy is CamVid's
from data_prep.device_augment import AugmentConfig, DeviceBatches, StreamedBatches
from pipelines.core import engine
from pipelines.core.measure import merge_rates, mfu_figures, peak_rates, run_isolated
from segnet import build_model, segmentation_loss
from segnet.metrics import boundary_f1_per_image, boundary_f1_torch

# (row name, reference?, channels_last, compile mode, bf16); speed is reported against the plain
# channels_last reference of the same precision. Each row is stopped at the time budget, so a slow compile
# costs its row, not the check.
STEP_ROWS = [
    ("plain reference, NCHW", True, False, None, True),
    ("plain reference, channels_last", True, True, None, True),
    ("ours, eager", False, True, None, True),
    ("ours, torch.compile", False, True, "default", True),
    ("plain reference, channels_last, torch.compile", True, True, "default", True),
    ("ours, torch.compile reduce-overhead (CUDA graphs)", False, True, "reduce-overhead", True),
    ("plain reference, channels_last", True, True, None, False),  # fp32 without TF32: cuDNN's search
    ("ours, eager", False, True, None, False),  # for it took 74 s on an H200
]


def precision_rates(device: str) -> dict:
    """{bf16?: {source: rate}}: the peak rates (matmul and 3x3 convolution) in each row precision."""
    return {amp: peak_rates(torch.bfloat16 if amp else torch.float32, device) for amp in (True, False)}


def step_row(spec: dict, name: str, deadline: float) -> dict:
    """One row's figures, measured in a fresh process stopped at the deadline."""
    row = {"row": name, "precision": "bf16 autocast" if spec["amp"] else "fp32", "compile": spec["compile"]}
    try:
        m = run_isolated(spec, timeout=max(deadline - time.monotonic(), 10))
    except Exception as e:  # noqa: BLE001 - one failing variant is a finding, not the end of the check
        return {**row, "error": f"{type(e).__name__}: {e}"[:300]}
    images_per_s = spec["batch"] / m["seconds_per_step"]
    print(
        f"  {name}, {row['precision']}: {images_per_s:.1f} img/s (warm-up {m['warmup_s']:.0f} s)", flush=True
    )
    achieved = m["flops_per_image"] * images_per_s
    return {**row, **m, "images_per_s": images_per_s, "achieved_flops_per_s": achieved}


def skip_reason(device: str, mode, deadline: float, tiny: bool, eager_only: bool) -> str | None:
    if (tiny or eager_only) and mode:
        return "compiled rows skipped (--tiny or --eager-only)"
    if device == "cpu" and mode == "reduce-overhead":
        return "CUDA graphs need a GPU"
    return "time budget spent" if time.monotonic() > deadline else None


def step_rows(
    device: str,
    model: str,
    size,
    batch: int,
    steps: int,
    deadline: float,
    tiny: bool,
    eager_only: bool = False,
) -> dict:
    """Each row in a fresh process; MFU against the best rate of its precision, measured before and after
    all rows; speed against the plain channels_last reference of the same precision."""
    before, rows = precision_rates(device), []
    for name, reference, channels_last, mode, amp in STEP_ROWS:
        skipped = skip_reason(device, mode, deadline, tiny, eager_only)
        if skipped:
            rows.append({"row": name, "precision": "bf16 autocast" if amp else "fp32", "skipped": skipped})
            continue
        spec = {
            "device": device,
            "model": model,
            "size": tuple(size),
            "batch": batch,
            "mode": "train",
            "steps": steps,
            "threads": torch.get_num_threads(),
            "amp": amp,
            "reference": reference,
            "channels_last": channels_last,
            "compile": mode,
            "tf32": False,
            "num_classes": CAMVID.num_classes,
        }
        rows.append(step_row(spec, name, deadline))
    after = precision_rates(device)
    rates = {amp: merge_rates(before[amp], after[amp]) for amp in (True, False)}
    for row in rows:
        rated = rates[row["precision"].startswith("bf16")]
        if "achieved_flops_per_s" in row:
            row.update(mfu_figures(row["achieved_flops_per_s"], rated))
        base = next((r for r in rows if r["row"] == "plain reference, channels_last"
                     and r["precision"] == row["precision"] and "images_per_s" in r), None)  # fmt: skip
        if base and "images_per_s" in row:
            row["speed_vs_plain_channels_last"] = row["images_per_s"] / base["images_per_s"]
    peaks = {("bf16" if amp else "fp32"): rated for amp, rated in rates.items()}
    return {"rows": rows, "peak_rates": peaks}


def samples_per_s(batches, device, epochs: int = 3) -> float:
    """Samples/s over `epochs` passes of a device batch iterator, the device synchronised at both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, n = time.perf_counter(), 0
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for x, _ in batches:
            n += len(x)
    sync()
    return n / (time.perf_counter() - t0)


def input_path(images, labels, device, size, batch: int) -> dict:
    """Augmented samples/s of the device path (resident split), and JPEG decode per CPU core."""
    batches = DeviceBatches(
        images,
        labels,
        batch,
        size,
        augment=AugmentConfig(*size),
        drop_last=True,
        device=device,
        void=CAMVID.void_index,
    )
    for _ in batches:  # warm-up
        break
    return {
        "device_augment_samples_per_s": samples_per_s(batches, device),
        "batch_size": batch,
        "augment_size": f"{size[0]}x{size[1]}",
        "resident_bytes": batches.images.numel() + batches.labels.numel(),
    }


def streamed_input(images, labels, device, size, batch: int) -> dict:
    """The streamed device path (pinned host chunks, copied on a side stream), with a budget of a quarter
    of the split so that it streams; compare with the resident rate of the `input` section."""
    samples = [{"image": im, "label": lb} for im, lb in zip(images, labels)]
    need = images.nbytes + labels.nbytes
    shards = [min(32, len(samples) - i) for i in range(0, len(samples), 32)]  # prepare's shard size
    budget = max(need // 4, 2 * batch * (need // len(samples)))
    batches = StreamedBatches(
        samples,
        shards,
        batch,
        size,
        budget,
        augment=AugmentConfig(*size),
        drop_last=True,
        device=device,
        void=CAMVID.void_index,
    )
    return {
        "streamed_samples_per_s": samples_per_s(batches, device),
        "chunk_samples": batches.chunk_samples,
        "split_bytes": need,
        "pinned": device.type == "cuda",
    }


def bf_check(labels: np.ndarray, device) -> dict:
    """GPU BF against the scipy BF on real test labels with a shifted, noisy prediction."""
    rng = np.random.default_rng(0)
    target = labels.astype(np.int64)
    pred = np.roll(target, 4, axis=2)
    noise = rng.random(pred.shape) < 0.05
    pred[noise] = rng.integers(0, CAMVID.num_classes, int(noise.sum()))
    pred[pred == CAMVID.void_index] = 0
    t0 = time.perf_counter()
    cpu = boundary_f1_per_image(pred, target, CAMVID.num_classes)
    cpu_s = time.perf_counter() - t0
    p, t = torch.from_numpy(pred).to(device), torch.from_numpy(target).to(device)
    boundary_f1_torch(p[:2], t[:2], CAMVID.num_classes)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    dev = boundary_f1_torch(p, t, CAMVID.num_classes).cpu().numpy()
    dev_s = time.perf_counter() - t0
    return {
        "images": len(target),
        "max_abs_difference": float(np.nanmax(np.abs(cpu - dev))),
        "scipy_cpu_s": cpu_s,
        "torch_device_s": dev_s,
        "speedup": cpu_s / dev_s,
    }


def short_training(data, device, size, batch: int, seconds: float, compile: bool, tiny: bool) -> dict:
    """segnet-basic, the paper's recipe (SGD 0.1, momentum 0.9, median frequency), bf16 on a GPU,
    trained for `seconds` through the device input path, then scored on the test split."""
    limit = 8 if tiny else None
    images, labels = read_compact(data, "train", limit)
    test_images, test_labels = read_compact(data, "test", limit)
    torch.manual_seed(0)
    model = build_model("segnet-basic", CAMVID.num_classes).to(device).to(memory_format=torch.channels_last)
    if compile:
        engine.compile_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    weights = label_weights(labels, CAMVID.num_classes)
    loss_fn = segmentation_loss(weights, ignore_index=CAMVID.void_index).to(device)
    train = DeviceBatches(
        images,
        labels,
        batch,
        size,
        augment=AugmentConfig(*size),
        drop_last=True,
        device=device,
        void=CAMVID.void_index,
    )
    test = DeviceBatches(test_images, test_labels, batch, size, device=device)
    amp = device.type == "cuda"
    history, t0, epoch = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or epoch < 1:
        train.set_epoch(epoch)
        stats = engine.train_epoch(model, train, loss_fn, optimizer, device, amp=amp, channels_last=True)
        history.append({"epoch": epoch, **stats})
        print(
            f"  epoch {epoch + 1}: loss {stats['train_loss']:.3f}, "
            f"{stats['train_images_per_s']:.0f} img/s, data wait {stats['data_wait_fraction']:.1%}",
            flush=True,
        )
        epoch += 1
    train_s = time.perf_counter() - t0
    meter, _ = engine.evaluate(model, test, device, CAMVID.num_classes, amp=amp, channels_last=True)
    s = meter.compute()
    return {
        "model": "segnet-basic",
        "image_size": f"{size[0]}x{size[1]}",
        "batch_size": batch,
        "epochs": epoch,
        "train_seconds": train_s,
        "compiled": compile,
        "history": history,
        "test_images": len(test_images),
        "test_global_accuracy": s["global_accuracy"],
        "test_class_accuracy": s["class_accuracy"],
        "test_miou": s["miou"],
        "test_bf": s["bf"],
    }


def summary_md(report: dict) -> str:
    lines = [
        f"# GPU check, {report['device']}, {report['date']}",
        "",
        f"torch {report['torch']}; {report['settings']}",
        "",
        "| variant | precision | img/s | MFU | vs plain channels_last | peak memory MiB | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["steps"]["rows"]:
        if "images_per_s" not in r:
            lines.append(f"| {r['row']} | {r['precision']} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        mfu = f"{r['mfu']:.0%}" if r.get("mfu") is not None else r.get("mfu_error", "")
        lines.append(
            f"| {r['row']} | {r['precision']} | {r['images_per_s']:.0f} | {mfu} | "
            f"{r.get('speed_vs_plain_channels_last', float('nan')):.2f}x | "
            f"{r['peak_memory_bytes'] / 2**20:,.0f} | {r['warmup_s']:.0f} |"
        )
    peaks = "; ".join(
        f"{precision}: " + ", ".join(f"{k} {r['best'] / 1e12:.1f} TFLOP/s (worst burst {r['spread']:.0%})"
                                     for k, r in rated.items())
        for precision, rated in report["steps"]["peak_rates"].items()
    )  # fmt: skip
    lines += ["", f"Measured peaks (MFU against the best of its precision, best burst): {peaks}.", ""]
    i, b, t = report["input"], report["bf"], report["training"]
    last = t["history"][-1]
    lines += [
        f"Input: device-side augmentation {i['device_augment_samples_per_s']:,.0f} samples/s at "
        f"{i['augment_size']} (batch {i['batch_size']}); JPEG decode "
        f"{report['jpeg_decode_per_core_per_s']:.0f} images/s per CPU core.",
        f"BF: device {b['torch_device_s']:.3f} s vs scipy {b['scipy_cpu_s']:.2f} s on {b['images']} "
        f"test labels ({b['speedup']:.0f}x); max |difference| {b['max_abs_difference']:.1e}.",
        f"Training: {t['model']} {t['image_size']}, {t['epochs']} epochs in {t['train_seconds']:.0f} s"
        f" (compiled: {t['compiled']}; last epoch {last['train_images_per_s']:.0f} img/s, data "
        f"wait {last['data_wait_fraction']:.1%}); test G {t['test_global_accuracy']:.3f}, "
        f"C {t['test_class_accuracy']:.3f}, mIoU {t['test_miou']:.3f}, BF {t['test_bf']:.3f} "
        f"({t['test_images']} images).",
        "",
    ]
    st = report.get("streamed", {})
    if "streamed_samples_per_s" in st:
        lines.insert(-1, f"Streamed device input (chunks of {st['chunk_samples']}, pinned: {st['pinned']}): "
                     f"{st['streamed_samples_per_s']:,.0f} samples/s.")  # fmt: skip
    return "\n".join(lines)


def sizes(tiny: bool) -> tuple[str, tuple[int, int], int, int]:
    """(step model, image size, batch, timed steps): the check's, or the dry run's tiny ones."""
    return ("segnet-basic", (48, 64), 2, 2) if tiny else ("segnet", (360, 480), 12, 20)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=".gpu/camvid", help="compact CamVid (python -m data_prep.compact)")
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--tiny", action="store_true", help="dry run: tiny sizes, any device")
    parser.add_argument("--budget-s", type=float, default=420, help="stop adding step rows after this")
    parser.add_argument("--train-s", type=float, default=60, help="seconds of segnet-basic training")
    parser.add_argument("--eager-only", action="store_true", help="no torch.compile anywhere (faster)")
    return parser.parse_args(argv)


def run_sections(args, device, report: dict, save) -> None:
    """Steps, input path, BF and the short training, each recorded (or its error) and saved as it ends."""
    start = time.monotonic()
    model, size, batch, steps = sizes(args.tiny)

    def section(key, fn):  # a failing section is recorded, and the others still run
        print(f"gpu-check on {report['device']}: {key}", flush=True)
        try:
            report[key] = fn()
        except Exception as e:  # noqa: BLE001
            report[key] = {"error": f"{type(e).__name__}: {e}"}
        save()

    deadline = start + args.budget_s - args.train_s
    section(
        "steps",
        lambda: step_rows(device.type, model, size, batch, steps, deadline, args.tiny, args.eager_only),
    )
    images, labels = read_compact(args.data, "test", 8 if args.tiny else None)
    t0 = time.perf_counter()
    read_compact(args.data, "test", 24)
    report["jpeg_decode_per_core_per_s"] = 24 / (time.perf_counter() - t0)  # one process, one core
    section("input", lambda: input_path(images, labels, device, size, batch))
    section("streamed", lambda: streamed_input(images, labels, device, size, batch))
    section("bf", lambda: bf_check(labels, device))
    compile = device.type == "cuda" and not args.eager_only
    train_s = 1 if args.tiny else args.train_s
    section("training", lambda: short_training(args.data, device, size, batch, train_s, compile, args.tiny))
    report["seconds"] = time.monotonic() - start
    save()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, size, batch, _ = sizes(args.tiny)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu {platform.machine()}",
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "settings": f"{model}, batch {batch}, {size[0]}x{size[1]}, train step, no TF32",
    }

    def save():
        tmp = out / "gpu-check.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out / "gpu-check.json")

    run_sections(args, device, report, save)
    failed = [k for k in ("steps", "input", "bf", "training") if "error" in report[k]]
    if failed:
        print(json.dumps({k: report[k] for k in failed}, indent=2))
        return 1
    (out / "gpu-check.md").write_text(summary_md(report))
    print(summary_md(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
