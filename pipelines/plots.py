"""PNGs people would rather look at: confusion matrix, prediction overlays, training curves."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from segnet import CLASSES  # noqa: E402

# The SegNet CamVid palette (Sky .. Bicyclist), void black.
PALETTE = np.array(
    [
        [128, 128, 128],
        [128, 0, 0],
        [192, 192, 128],
        [128, 64, 128],
        [60, 40, 222],
        [128, 128, 0],
        [192, 128, 128],
        [64, 64, 128],
        [64, 0, 128],
        [64, 64, 0],
        [0, 128, 192],
        [0, 0, 0],
    ],
    dtype=np.uint8,
)


def display_image(x: torch.Tensor, size) -> np.ndarray:
    """A uint8 3xHxW model input as an HxWx3 picture at the label's size, for overlays."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return x.clamp(0, 255).byte().permute(1, 2, 0).numpy()


def colourise(label: np.ndarray) -> np.ndarray:
    return PALETTE[np.clip(label, 0, len(PALETTE) - 1)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Class colours blended over the image; void pixels show the image alone."""
    colours = colourise(label).astype(np.float32)
    out = image.astype(np.float32)
    mask = label < len(CLASSES)
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[mask]
    return out.astype(np.uint8)


def legend(width: int, swatch: int = 14) -> np.ndarray:
    """A white strip naming each class beside its colour (void: black, shown as the bare image)."""
    names = [*CLASSES, "void"]
    cell = max(110, swatch + 8 + 7 * max(map(len, names)))
    per_row = max(1, width // cell)
    rows = -(-len(names) // per_row)
    strip = Image.new("RGB", (width, rows * (swatch + 8) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        x, y = (i % per_row) * cell + 6, (i // per_row) * (swatch + 8) + 6
        draw.rectangle(
            [x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in PALETTE[i]), outline="black"
        )
        draw.text((x + swatch + 5, y + 1), name, fill="black")
    return np.asarray(strip)


def save_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray | None, path: Path) -> Path:
    """Image | prediction overlay | ground-truth overlay, side by side, over a legend of the class colours."""
    panels = [image, overlay(image, pred)]
    if target is not None:
        panels.append(overlay(image, target))
    row = np.concatenate(panels, axis=1)
    Image.fromarray(np.concatenate([row, legend(row.shape[1])], axis=0)).save(path)
    return path


def save_confusion_matrix(cm: np.ndarray, path: Path, title: str = "confusion matrix") -> Path:
    """Row-normalised (recall per ground-truth class) confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=60, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for i in range(len(norm)):
        for j in range(len(norm)):
            if norm[i, j] >= 0.01:
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_curves(history: list[dict], path: Path) -> Path:
    """Training loss and validation G / C / mIoU / BF per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    for key, name in [
        ("val_global_accuracy", "G"),
        ("val_class_accuracy", "C"),
        ("val_miou", "mIoU"),
        ("val_bf", "BF"),
    ]:
        b.plot(epochs, [h[key] for h in history], marker="o", label=name)
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend()
    b.set_title("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_table1_chart(lines: list[dict], modes: list[str], path: Path) -> Path:
    """Test mIoU and BF per Table 1 variant: ours (solid) beside the paper's (hatched), per balancing."""
    variants = list(dict.fromkeys(x["paper_name"] for x in lines))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(variants)), 4.5))
    width = 0.8 / (2 * len(modes))
    x = np.arange(len(variants))
    for ax, measure in zip(axes, ("mIoU", "BF")):
        for j, mode in enumerate(modes):
            by_name = {r["paper_name"]: r for r in lines if r["balancing"] == mode}
            for k, (key, hatch) in enumerate(((measure, None), (f"paper_{measure}", "//"))):
                offset = (2 * j + k - len(modes) + 0.5) * width
                values = [by_name[v][key] for v in variants]
                label = f"{'paper' if k else 'ours'}, {mode.replace('_', ' ')}"
                ax.bar(x + offset, values, width, label=label, hatch=hatch, color=f"C{j}", alpha=1 - 0.45 * k)
        ax.set_xticks(x, variants, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"test {measure} (%)")
        ax.set_ylim(0, 100 if measure == "mIoU" else 60)
        ax.set_title(f"test {measure}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_latency_plot(latencies_ms: list[float], starts_s: list[float], title: str, path: Path) -> Path:
    """Each request's latency over the bench's time, and their distribution with p50/p95/p99 marked."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(starts_s, latencies_ms, ".", markersize=3)
    left.set_xlabel("request start (s)")
    left.set_ylabel("latency (ms)")
    right.hist(latencies_ms, bins=40)
    for q in (50, 95, 99):
        right.axvline(np.percentile(latencies_ms, q), color="k", linestyle=":", linewidth=1)
        right.text(np.percentile(latencies_ms, q), right.get_ylim()[1] * 0.95, f"p{q}", rotation=90, va="top")
    right.set_xlabel("latency (ms)")
    right.set_ylabel("requests")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
