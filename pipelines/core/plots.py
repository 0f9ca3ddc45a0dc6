"""PNGs people would rather look at: confusion matrix, prediction overlays, training curves, uncertainty."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from data_prep.datasets import DatasetDescription  # noqa: E402


def display_image(x: torch.Tensor, size) -> np.ndarray:
    """A uint8 3xHxW model input as an HxWx3 picture at the label's size, for overlays."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return x.clamp(0, 255).byte().permute(1, 2, 0).numpy()


def colourise(label: np.ndarray, dataset: DatasetDescription) -> np.ndarray:
    """Each pixel in its class's display colour (the dataset's palette, void last)."""
    palette = np.array(dataset.palette, dtype=np.uint8)
    return palette[np.clip(label, 0, len(palette) - 1)]


def overlay(
    image: np.ndarray, label: np.ndarray, dataset: DatasetDescription, alpha: float = 0.5
) -> np.ndarray:
    """Class colours blended over the image; void pixels show the image alone."""
    colours = colourise(label, dataset).astype(np.float32)
    out = image.astype(np.float32)
    mask = label < dataset.num_classes
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[mask]
    return out.astype(np.uint8)


def legend(width: int, dataset: DatasetDescription, swatch: int = 14) -> np.ndarray:
    """A white strip naming each class of the dataset beside its colour (void: shown as the bare image)."""
    names, palette = [*dataset.classes, "void"], dataset.palette
    cell = max(110, swatch + 8 + 7 * max(map(len, names)))
    per_row = max(1, width // cell)
    rows = -(-len(names) // per_row)
    strip = Image.new("RGB", (width, rows * (swatch + 8) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        x, y = (i % per_row) * cell + 6, (i // per_row) * (swatch + 8) + 6
        draw.rectangle(
            [x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in palette[i]), outline="black"
        )
        draw.text((x + swatch + 5, y + 1), name, fill="black")
    return np.asarray(strip)


def with_legend(image: np.ndarray, dataset: DatasetDescription) -> np.ndarray:
    """The image over the legend of the dataset's classes (predict's overlays)."""
    return np.concatenate([image, legend(image.shape[1], dataset)], axis=0)


UNCERTAINTY_COLOURS = "inferno"  # dark: certain, bright: uncertain; reads in grey print too


def grey_levels(values: np.ndarray, rows: int = 256) -> np.ndarray:
    """Values in [0, 1] (HxW float) as uint8 0..255 (value / 255 gives them back to 1/255), a band of rows
    at a time: no full-size float copy of a large map."""
    out = np.empty(values.shape, np.uint8)
    for y in range(0, len(values), rows):
        out[y : y + rows] = np.rint(np.clip(values[y : y + rows], 0, 1) * 255)
    return out


def heat_map(values: np.ndarray, colours: str = UNCERTAINTY_COLOURS) -> np.ndarray:
    """Values in [0, 1] (HxW) as uint8 HxWx3 colours, through a 256-entry table: 4 bytes a pixel."""
    table = (plt.get_cmap(colours)(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return table[grey_levels(values)]


def colour_bar(width: int, label: str, colours: str = UNCERTAINTY_COLOURS, height: int = 12) -> np.ndarray:
    """A white strip with the colour scale from 0 (left) to 1 (right), its ticks and what it measures."""
    margin = 6
    span = max(1, width - 2 * margin)
    strip = Image.new("RGB", (width, height + 36), "white")
    bar = heat_map(np.tile(np.linspace(0, 1, span), (height, 1)), colours)
    strip.paste(Image.fromarray(bar), (margin, 4))
    draw = ImageDraw.Draw(strip)
    for value in (0, 0.5, 1):
        x = margin + round(value * (span - 1))
        draw.line([x, height + 4, x, height + 8], fill="black")
        text = f"{value:g}"
        draw.text((min(max(x - 3 * len(text), 0), width - 6 * len(text)), height + 9), text, fill="black")
    draw.text((margin, height + 21), label, fill="black")
    return np.asarray(strip)


def uncertainty_picture(uncertainty: np.ndarray) -> np.ndarray:
    """Predict's NAME_uncertainty.png: the per-pixel uncertainty as a heat map at the image's size, over a
    colour bar of its scale."""
    label = "uncertainty: predictive entropy / log K"
    return np.concatenate([heat_map(uncertainty), colour_bar(uncertainty.shape[1], label)], axis=0)


def save_uncertainty_curve(accuracy: list[float], ece: float, path: Path, title: str) -> Path:
    """Bayesian SegNet's accuracy against uncertainty: pixel accuracy of each uncertainty decile, least
    uncertain first; the expected calibration error in the title."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    parts = len(accuracy)
    centres = (np.arange(parts) + 0.5) * 100 / parts
    ax.plot(centres, accuracy, marker="o")
    ax.set_xlabel("uncertainty percentile (pixels ranked, least uncertain first)")
    ax.set_ylabel("pixel accuracy")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}\nECE {ece:.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_overlay(
    image: np.ndarray, pred: np.ndarray, target: np.ndarray | None, path: Path, dataset: DatasetDescription
) -> Path:
    """Image | prediction overlay | ground-truth overlay, side by side, over a legend of the class colours."""
    panels = [image, overlay(image, pred, dataset)]
    if target is not None:
        panels.append(overlay(image, target, dataset))
    row = np.concatenate(panels, axis=1)
    Image.fromarray(np.concatenate([row, legend(row.shape[1], dataset)], axis=0)).save(path)
    return path


def save_confusion_matrix(cm: np.ndarray, path: Path, classes, title: str = "confusion matrix") -> Path:
    """Row-normalised (recall per ground-truth class) confusion matrix, labelled with the classes."""
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
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


def save_validation_plots(out: Path, confusion, history: list[dict], examples, dataset, epoch: int) -> Path:
    """A run's PNGs, from the numbers its newest checkpoint holds (checkpoint.read_validation): the
    validation confusion matrix (and its CSV), training curves, and (image, prediction, label) overlays."""
    out.mkdir(parents=True, exist_ok=True)
    title = f"validation, epoch {epoch + 1}"
    save_confusion_matrix(confusion, out / "confusion_matrix_val.png", dataset.classes, title)
    np.savetxt(out / "confusion_matrix_val.csv", confusion, fmt="%d", delimiter=",")
    save_curves(history, out / "training_curves.png")
    for i, (x, pred, label) in enumerate(examples):
        picture = display_image(torch.from_numpy(x), label.shape)
        save_overlay(picture, pred, label, out / f"overlay_val_{i}.png", dataset)
    return out


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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.0))
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


def save_soak_plot(results: list[tuple], samples: list[tuple], figures: dict, title: str, path: Path) -> Path:
    """A soak over time: each request's latency (errors marked), and the replicas' RSS with its
    least-squares line after the warm-up."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    ok = [(s, 1000 * t) for s, t, status in results if status == 200]
    failed = [(s, 1000 * t) for s, t, status in results if status != 200]
    for points, style, label in ((ok, ".", "200"), (failed, "x", "error")):
        if points:
            left.plot(*zip(*points), style, markersize=3, label=label)
    left.set_xlabel("scheduled start (s)")
    left.set_ylabel("latency (ms)")
    left.legend(loc="upper right")
    t = np.array([s for s, _ in samples])
    right.plot(t, [b / 2**20 for _, b in samples], linewidth=1, label="replica RSS")
    fit = t[t >= min(figures["rss_warmup_s"], t[-1])]
    slope, intercept = figures["rss_slope_mb_per_min"], figures["rss_intercept_mb"]
    right.plot(fit, intercept + slope * fit / 60, "k--", linewidth=1, label=f"{slope:+.2f} MB/min")
    right.set_xlabel("time (s)")
    right.set_ylabel("RSS (MB)")
    right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
