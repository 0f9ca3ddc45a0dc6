"""A look at a described dataset before training on it: `segnet prepare --dataset` writes preview.png beside
the manifest, a few train and val images with their masks overlaid under the description's legend, and each
split's class pixel shares. A wrong colour map or void value shows there before anyone trains on it.

The samples are decoded by the same `load_pair` that fills the shards, so the overlay shows the stored
classes. Drawn with matplotlib's object API (no pyplot state), here in data_prep, which imports nothing from
pipelines."""

import io

import numpy as np

from data_prep import storage
from data_prep.datasets import DatasetDescription, Pair, load_pair

PREVIEW = "preview.png"
SHOWN = {"train": 3, "val": 2}  # images shown per split
ALPHA = 0.55  # the class colour's share of an overlaid pixel


def overlay(image: np.ndarray, label: np.ndarray, dataset: DatasetDescription) -> np.ndarray:
    """Class colours blended over the image; void pixels show the image alone."""
    colours = np.array(dataset.palette, np.float32)[label]
    out = image.astype(np.float32)
    known = label < dataset.void_index
    out[known] = (1 - ALPHA) * out[known] + ALPHA * colours[known]
    return out.astype(np.uint8)


def pixel_shares(manifest: dict) -> dict[str, np.ndarray]:
    """Per split, each class's share of the split's pixels (void last), in percent, from the manifest."""
    shares = {}
    for split, info in manifest["splits"].items():
        counts = np.asarray(info["class_pixel_counts"], np.float64)
        shares[split] = 100 * counts / max(counts.sum(), 1)
    return shares


def draw_preview(dataset: DatasetDescription, samples: list[tuple[str, dict]], manifest: dict) -> bytes:
    """The preview as PNG bytes: overlaid samples on top, the legend, the class-share histogram below."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = [*dataset.classes, "void"]
    cols = max(len(samples), 1)
    fig = Figure(figsize=(max(3.2 * cols, 0.45 * len(names) + 4), 8.5), dpi=100)
    grid = fig.add_gridspec(3, cols, height_ratios=[1, 0.12 * (1 + len(names) // 8), 1.1], hspace=0.35)
    for i, (split, s) in enumerate(samples):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(overlay(s["image"], s["label"], dataset), interpolation="nearest")
        ax.set_title(f"{split}: {s['name']}\n{s['label'].shape[0]}x{s['label'].shape[1]}", fontsize=9)
        ax.axis("off")
    colours = [np.array(c) / 255 for c in dataset.palette]
    handles = [Patch(facecolor=c, edgecolor="black", label=n) for c, n in zip(colours, names)]
    handles[-1].set_label("void (image only)")
    key = fig.add_subplot(grid[1, :])
    key.axis("off")
    key.legend(handles=handles, loc="center", ncol=min(len(names), 8), fontsize=9, title="classes")
    fig.suptitle(f"dataset {dataset.name!r}: {dataset.num_classes} classes", fontsize=12)
    ax = fig.add_subplot(grid[2, :])
    shares = pixel_shares(manifest)
    x, width = np.arange(len(names)), 0.8 / max(len(shares), 1)
    for j, (split, share) in enumerate(shares.items()):
        n = manifest["splits"][split]["num_images"]
        ax.bar(x + (j - (len(shares) - 1) / 2) * width, share, width, label=f"{split} ({n} images)")
    ax.set_xticks(x, names, rotation=30 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    ax.set_ylabel("share of the split's pixels (%)")
    ax.set_title("class pixel shares per split", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def write_preview(out: str, dataset: DatasetDescription, pairs: dict[str, list[Pair]], manifest: dict) -> str:
    """preview.png beside the manifest in `out` (a folder or URI), written whole (`storage.write_bytes`)."""
    samples = [(split, load_pair(dataset, p)) for split, n in SHOWN.items() for p in pairs.get(split, [])[:n]]
    location = storage.join(out, PREVIEW)
    storage.write_bytes(location, draw_preview(dataset, samples, manifest))
    return location
