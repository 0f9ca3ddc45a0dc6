"""Class-weighted cross entropy and the class balancing of the paper (Sec. 3.1, after Eigen & Fergus)."""

import numpy as np

from segnet.errors import SegNetError

WEIGHTING_MODES = ("none", "median_frequency", "inverse_frequency")


def class_weights(pixel_counts, image_pixel_counts=None, mode: str = "median_frequency") -> np.ndarray:
    """Per-class loss weights from class statistics (void, if present as a 12th entry, is dropped by caller).

    - `median_frequency`: w_c = median(f) / f_c with f_c = pixels of c / total pixels of images containing c.
    - `inverse_frequency`: w_c = N / (K * n_c), so a class with its fair share of pixels gets 1.
    - `none`: all ones (natural frequency).
    A class never seen gets weight 0: it cannot contribute to the loss anyway.
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if mode not in WEIGHTING_MODES:
        raise SegNetError(f"unknown class weighting {mode!r}; choose one of: {', '.join(WEIGHTING_MODES)}")
    if counts.ndim != 1 or (counts < 0).any():
        raise SegNetError(f"pixel_counts must be a 1-d array of non-negative counts, got {pixel_counts!r}")
    if mode == "none":
        return np.ones_like(counts)
    seen = counts > 0
    weights = np.zeros_like(counts)
    if not seen.any():
        raise SegNetError("pixel_counts are all zero: no class statistics to weight by")
    if mode == "median_frequency":
        if image_pixel_counts is None:
            raise SegNetError("median_frequency weighting needs image_pixel_counts")
        totals = np.asarray(image_pixel_counts, dtype=np.float64)
        if totals.shape != counts.shape or (totals[seen] < counts[seen]).any():
            raise SegNetError(
                "image_pixel_counts must have one entry per class, each at least that class's pixel count"
            )
        freq = counts[seen] / totals[seen]
        weights[seen] = np.median(freq) / freq
    else:
        weights[seen] = counts.sum() / (seen.sum() * counts[seen])
    return weights


def segmentation_loss(weights=None, *, ignore_index: int) -> "torch.nn.CrossEntropyLoss":  # noqa: F821
    """Cross entropy over pixels that ignores void (`ignore_index`: K for K classes, as shards store it)
    and weights each class. (torch is imported here: `class_weights` serves processes without it.)"""
    import torch
    from torch import nn

    w = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=w, ignore_index=ignore_index)
