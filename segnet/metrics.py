"""The paper's measures (Sec. 4): global accuracy G, class average accuracy C, mIoU, boundary F1 (BF).

The confusion matrix is a plain int64 tensor so DDP workers can sum it with one all_reduce; BF is kept as
a per-image sum and count for the same reason.
"""

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

BF_TOLERANCE = 0.0075  # fraction of the image diagonal within which boundary pixels match (Csurka et al.)


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def confusion_matrix(pred, target, num_classes: int = 11, ignore_index: int = 11) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = ground truth, columns = prediction; void pixels skipped."""
    pred, target = _as_tensor(pred).reshape(-1).long(), _as_tensor(target).reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


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


def segmentation_scores(pred, target, num_classes: int = 11, ignore_index: int = 11) -> dict:
    """G, C, mIoU and per-class IoU of integer maps of shape (N, H, W), numpy or torch."""
    return scores_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


class ConfusionMatrix:
    """Accumulates over batches; `matrix` is what DDP workers all_reduce (sum) before `scores()`."""

    def __init__(self, num_classes: int = 11, ignore_index: int = 11):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

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


def boundary_f1_per_image(pred, target, num_classes: int = 11, ignore_index: int = 11) -> np.ndarray:
    """BF of each image: mean over classes in the ground truth or the prediction of the boundary F1."""
    pred, target = _as_tensor(pred).cpu().numpy(), _as_tensor(target).cpu().numpy()
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
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


def boundary_f1(pred, target, num_classes: int = 11, ignore_index: int = 11) -> float:
    """The paper's BF score: per-image boundary F1 averaged over images (images with no class skipped)."""
    per_image = boundary_f1_per_image(pred, target, num_classes, ignore_index)
    return float(np.nanmean(per_image)) if np.isfinite(per_image).any() else float("nan")
