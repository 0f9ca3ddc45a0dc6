"""The paper's measures (Sec. 4): global accuracy G, class average accuracy C, mIoU, boundary F1 (BF); and,
for Bayesian SegNet's Monte Carlo samples, calibration: the expected calibration error and pixel accuracy
against uncertainty (`CalibrationMeter`).

The confusion matrix is a plain int64 tensor so DDP workers can sum it with one all_reduce; BF is kept as
a per-image sum and count for the same reason. `SegmentationMeter` holds both, on the model's device.
BF has two implementations that agree exactly: scipy's distance transform on the CPU (the reference) and
a disc dilation in torch that runs wherever the predictions are (`boundary_f1_torch`).
"""

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

BF_TOLERANCE = 0.0075  # fraction of the image diagonal within which boundary pixels match (Csurka et al.)
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., ICML 2017)
UNCERTAINTY_PARTS = 10  # accuracy against uncertainty: pixels ranked by uncertainty, in deciles
UNCERTAINTY_LEVELS = 1000  # the ranking's resolution: pixels whose uncertainty rounds alike share a level


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = ground truth, columns = prediction; void pixels (the label
    `ignore_index`, by default K = num_classes, where shards store void) skipped."""
    ignore_index = num_classes if ignore_index is None else ignore_index
    pred, target = _as_tensor(pred).reshape(-1).long(), _as_tensor(target).reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores_from_confusion(cm) -> dict:
    """G = correct / non-void pixels; C = mean recall over classes in the ground truth; mIoU = mean IoU
    over classes present in the ground truth or the prediction (a class absent from both has no IoU: NaN
    in `per_class_iou`, left out of the mean)."""
    cm = _as_tensor(cm).double()
    tp = cm.diag()
    gt = cm.sum(1)
    predicted = cm.sum(0)
    union = gt + predicted - tp
    total = cm.sum()
    g = (tp.sum() / total).item() if total > 0 else float("nan")
    recall = tp[gt > 0] / gt[gt > 0]
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
    present = union > 0
    return {
        "global_accuracy": g,
        "class_accuracy": recall.mean().item() if len(recall) else float("nan"),
        "miou": iou[present].mean().item() if present.any() else float("nan"),
        "per_class_iou": iou.tolist(),
    }


def segmentation_scores(pred, target, num_classes: int, ignore_index: int | None = None) -> dict:
    """G, C, mIoU and per-class IoU of integer maps of shape (N, H, W), numpy or torch."""
    return scores_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


class ConfusionMatrix:
    """Accumulates over batches; `matrix` is what DDP workers all_reduce (sum) before `scores()`."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes = num_classes
        self.ignore_index = num_classes if ignore_index is None else ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()

    def scores(self) -> dict:
        return scores_from_confusion(self.matrix)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour inside the image that is not in the mask."""
    edge = np.zeros_like(mask)
    edge[1:, :] |= mask[1:, :] & ~mask[:-1, :]
    edge[:-1, :] |= mask[:-1, :] & ~mask[1:, :]
    edge[:, 1:] |= mask[:, 1:] & ~mask[:, :-1]
    edge[:, :-1] |= mask[:, :-1] & ~mask[:, 1:]
    return edge


def _matched(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    """Fraction of boundary pixels of `a` that have one of `b` within `tol` pixels."""
    if not a.any():
        return 1.0
    if not b.any():
        return 0.0
    dist = distance_transform_edt(~b)
    return float((dist[a] <= tol).mean())


def boundary_f1_per_image(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """BF of each image: mean over classes in the ground truth or the prediction of the boundary F1."""
    pred, target = _as_tensor(pred).cpu().numpy(), _as_tensor(target).cpu().numpy()
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    ignore_index = num_classes if ignore_index is None else ignore_index
    out = np.empty(len(pred))
    for i, (p, t) in enumerate(zip(pred, target)):
        valid = t != ignore_index
        tol = BF_TOLERANCE * float(np.hypot(*t.shape))
        f1s = []
        for c in range(num_classes):
            gt_mask, pred_mask = t == c, (p == c) & valid
            if not gt_mask.any() and not pred_mask.any():
                continue
            gt_b, pred_b = _boundary(gt_mask), _boundary(pred_mask)
            precision, recall = _matched(pred_b, gt_b, tol), _matched(gt_b, pred_b, tol)
            f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
        out[i] = np.mean(f1s) if f1s else np.nan
    return out


def boundary_f1(pred, target, num_classes: int, ignore_index: int | None = None) -> float:
    """The paper's BF score: per-image boundary F1 averaged over images (images with no class skipped)."""
    per_image = boundary_f1_per_image(pred, target, num_classes, ignore_index)
    return float(np.nanmean(per_image)) if np.isfinite(per_image).any() else float("nan")


def _disc_rows(radius: float) -> list[tuple[int, int]]:
    """(dy, half-width) of each row of the disc of offsets within `radius` (Euclidean), measured as
    distance_transform_edt measures them: a pixel is within `radius` of a boundary iff the disc around it
    holds a boundary pixel."""
    r = int(math.floor(radius))
    return [(dy, int(math.floor(math.sqrt(max(radius**2 - dy * dy, 0.0))))) for dy in range(-r, r + 1)]


def _dilate(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Disc dilation of (N, H, W) bool masks: each disc row is a horizontal dilation (grown one pixel a
    step by shifted ORs), shifted by its dy; only shifts and ORs, so it is exact on any device."""
    h = masks.shape[1]
    rows = _disc_rows(radius)
    wide, grown = {}, masks
    for rx in range(max(r for _, r in rows) + 1):
        if rx:
            step = grown.clone()
            step[:, :, 1:] |= grown[:, :, :-1]
            step[:, :, :-1] |= grown[:, :, 1:]
            grown = step
        wide[rx] = grown
    out = torch.zeros_like(masks)
    for dy, rx in rows:
        if abs(dy) >= h:
            continue
        if dy >= 0:
            out[:, : h - dy] |= wide[rx][:, dy:]
        else:
            out[:, -dy:] |= wide[rx][:, : h + dy]
    return out


def _boundaries(masks: torch.Tensor) -> torch.Tensor:
    """Pixels of each (.., H, W) bool mask with a 4-neighbour inside the image that is not in the mask."""
    edge = torch.zeros_like(masks)
    edge[..., 1:, :] |= masks[..., 1:, :] & ~masks[..., :-1, :]
    edge[..., :-1, :] |= masks[..., :-1, :] & ~masks[..., 1:, :]
    edge[..., :, 1:] |= masks[..., :, 1:] & ~masks[..., :, :-1]
    edge[..., :, :-1] |= masks[..., :, :-1] & ~masks[..., :, 1:]
    return edge


def boundary_f1_torch(pred, target, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """`boundary_f1_per_image` in torch on the predictions' device: every image and class at once, the
    tolerance disc applied by a convolution of the boundary maps. Returns a float64 tensor (NaN where an
    image has no class)."""
    pred, target = _as_tensor(pred), _as_tensor(target).to(pred.device)
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}"
        )
    ignore_index = num_classes if ignore_index is None else ignore_index
    n, h, w = target.shape
    classes = torch.arange(num_classes, device=pred.device).view(1, num_classes, 1, 1)
    gt = target[:, None] == classes
    pr = (pred[:, None] == classes) & (target[:, None] != ignore_index)
    gt_b, pr_b = _boundaries(gt), _boundaries(pr)
    tol = BF_TOLERANCE * math.hypot(h, w)

    def near(b):  # pixels within the tolerance of a boundary pixel of b
        return _dilate(b.reshape(-1, h, w), tol).view(n, num_classes, h, w)

    def matched(a, b):  # fraction of a's boundary pixels with one of b's within the tolerance
        count = a.sum((2, 3)).double()
        hit = (a & near(b)).sum((2, 3)).double()
        frac = hit / count.clamp(min=1)
        frac = torch.where(b.any(3).any(2), frac, torch.zeros_like(frac))
        return torch.where(count > 0, frac, torch.ones_like(frac))

    precision, recall = matched(pr_b, gt_b), matched(gt_b, pr_b)
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0
    )
    present = (gt.any(3).any(2) | pr.any(3).any(2)).double()
    count = present.sum(1)
    return torch.where(count > 0, (f1 * present).sum(1) / count.clamp(min=1), float("nan"))


def confidence_bins(confidence, correct, bins: int = ECE_BINS) -> torch.Tensor:
    """(3, bins) float64: per equal-width bin ((m-1)/bins, m/bins] of confidence, its pixel count, the sum
    of their confidences and how many of them are correct."""
    confidence = _as_tensor(confidence).reshape(-1).double()
    correct = _as_tensor(correct).reshape(-1).to(confidence.device).double()
    idx = (confidence * bins).ceil().long().clamp(1, bins) - 1  # a confidence of 0 joins the first bin
    out = torch.zeros(3, bins, dtype=torch.float64, device=confidence.device)
    out[0].index_add_(0, idx, torch.ones_like(confidence))
    out[1].index_add_(0, idx, confidence)
    out[2].index_add_(0, idx, correct)
    return out


def calibration_error(bins: torch.Tensor) -> float:
    """ECE = sum over bins of |B_m| / n * |acc(B_m) - conf(B_m)| = sum |correct_m - confidence_m| / n, from
    `confidence_bins`; NaN without pixels."""
    n = bins[0].sum().item()
    return (bins[2] - bins[1]).abs().sum().item() / n if n else float("nan")


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
    """The expected calibration error of pixels' confidences (max softmax) and whether each is correct."""
    return calibration_error(confidence_bins(confidence, correct, bins))


def uncertainty_levels(uncertainty, correct, levels: int = UNCERTAINTY_LEVELS) -> torch.Tensor:
    """(2, levels) float64: pixel count and correct count per level of uncertainty in [0, 1] (level
    floor(u * levels), 1 in the last): what `accuracy_by_uncertainty` ranks."""
    uncertainty = _as_tensor(uncertainty).reshape(-1).double()
    correct = _as_tensor(correct).reshape(-1).to(uncertainty.device).double()
    idx = (uncertainty * levels).floor().long().clamp(0, levels - 1)
    out = torch.zeros(2, levels, dtype=torch.float64, device=uncertainty.device)
    out[0].index_add_(0, idx, torch.ones_like(uncertainty))
    out[1].index_add_(0, idx, correct)
    return out


def accuracy_by_levels(levels: torch.Tensor, parts: int = UNCERTAINTY_PARTS) -> list[float]:
    """Pixel accuracy of each of `parts` equal shares of the pixels ranked by uncertainty, least uncertain
    first (Bayesian SegNet's accuracy against uncertainty). A level split by a share's edge gives each side
    its part of the level's pixels and of its correct ones. NaN for a share without pixels."""
    count, correct = levels[0].cpu(), levels[1].cpu()
    n = count.sum()
    upper = count.cumsum(0)
    lower = upper - count
    edges = torch.linspace(0, 1, parts + 1, dtype=torch.float64) * n
    lo, hi = edges[:-1, None], edges[1:, None]
    share = (torch.minimum(upper, hi) - torch.maximum(lower, lo)).clamp(min=0)  # (parts, levels) pixels
    right = (share * (correct / count.clamp(min=1))).sum(1)
    pixels = share.sum(1)
    return torch.where(pixels > 0, right / pixels.clamp(min=1e-12), float("nan")).tolist()


def accuracy_by_uncertainty(uncertainty, correct, parts: int = UNCERTAINTY_PARTS) -> list[float]:
    """Pixel accuracy per uncertainty decile (or `parts`), least uncertain pixels first."""
    return accuracy_by_levels(uncertainty_levels(uncertainty, correct), parts)


class CalibrationMeter:
    """ECE bins and uncertainty levels of an evaluation's pixels (void left out), from each batch's mean
    softmax (Bayesian SegNet's Monte Carlo estimate); sums, so DDP workers all_reduce them as the confusion
    matrix."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, device="cpu"):
        self.num_classes = num_classes
        self.ignore_index = num_classes if ignore_index is None else ignore_index
        self.bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)
        self.levels = torch.zeros(2, UNCERTAINTY_LEVELS, dtype=torch.float64, device=device)

    def update(self, probs: torch.Tensor, target: torch.Tensor, uncertainty: torch.Tensor) -> None:
        """probs (N, K, H, W) and uncertainty (N, H, W) at the target's size."""
        target = target.to(probs.device)
        keep = target != self.ignore_index
        confidence, pred = probs.max(1)
        correct = pred == target
        self.bins += confidence_bins(confidence[keep], correct[keep]).to(self.bins.device)
        self.levels += uncertainty_levels(uncertainty[keep], correct[keep]).to(self.levels.device)

    def compute(self) -> dict:
        curve = accuracy_by_levels(self.levels)
        return {"ece": calibration_error(self.bins), "accuracy_by_uncertainty": curve}


class SegmentationMeter:
    """The confusion matrix and the BF sums of an evaluation, kept on the predictions' device.

    `update` per batch, `all_reduce` once across DDP workers (sums, so each image counts once), then
    `compute`: the shape of torchvision's `ConfusionMatrix.reduce_from_all_processes`. With `calibrated`,
    `update` also takes the mean softmax and uncertainty of Monte Carlo samples, for `CalibrationMeter`."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, device="cpu", calibrated=False):
        self.num_classes = num_classes
        self.ignore_index = num_classes if ignore_index is None else ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.bf_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.bf_images = torch.zeros((), dtype=torch.float64, device=device)
        self.calibration = CalibrationMeter(num_classes, ignore_index, device) if calibrated else None

    def update(self, pred: torch.Tensor, target: torch.Tensor, probs=None, uncertainty=None) -> None:
        target = target.to(pred.device)
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        per_image = boundary_f1_torch(pred, target, self.num_classes, self.ignore_index)
        ok = per_image.isfinite()
        self.bf_sum += per_image[ok].sum().to(self.bf_sum.device)
        self.bf_images += ok.sum().to(self.bf_images.device)
        if self.calibration is not None:
            self.calibration.update(probs, target, uncertainty)

    def all_reduce(self) -> None:
        """Sum over the DDP workers (a no-op outside torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        sums = [self.matrix, self.bf_sum, self.bf_images]
        if self.calibration is not None:
            sums += [self.calibration.bins, self.calibration.levels]
        packed = torch.cat([t.flatten().double() for t in sums])
        dist.all_reduce(packed)
        parts = [p.view_as(t) for p, t in zip(packed.split([t.numel() for t in sums]), sums)]
        self.matrix, self.bf_sum, self.bf_images = parts[0].round().long(), parts[1], parts[2]
        if self.calibration is not None:
            self.calibration.bins, self.calibration.levels = parts[3], parts[4]

    def compute(self) -> dict:
        """G, C, mIoU, per-class IoU and BF (one host sync); ECE and accuracy by uncertainty if calibrated."""
        s = scores_from_confusion(self.matrix.cpu())
        images = self.bf_images.item()
        s["bf"] = self.bf_sum.item() / images if images else float("nan")
        if self.calibration is not None:
            s.update(self.calibration.compute())
        return s
