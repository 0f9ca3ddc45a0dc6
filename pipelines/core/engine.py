"""One training epoch and one evaluation, as torchvision's `train_one_epoch` and `evaluate`: shared by the
Ray Train worker loop, `segnet evaluate`, the benches and the GPU check. No Ray, no MLflow here.

Batches come either from a DataLoader (uint8 images on the CPU, augmented by albumentations in its
workers) or from `DeviceBatches` (already augmented and normalised on the device); both go through here.
"""

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data_prep.device_augment import MEAN, STD, normalize
from segnet.bayesian import MC_BATCH, mc_softmax, normalised_entropy
from segnet.metrics import ECE_BINS, SegmentationMeter


def use_compile(setting: str, device: torch.device) -> bool:
    """`auto` (auto | on | off, pipelines/config.py) compiles on CUDA, where it measured 1.33x the eager step
    (docs/benchmarks.md), and not on the CPU, where compiling costs more than it returns over a short run."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile in place (state_dict keys unchanged). Static shapes: training drops the last partial
    batch, so a run compiles once per mode (train, eval) and per evaluation batch shape, not per step."""
    model.compile(dynamic=False)
    return model


def _inputs(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """A batch as the model takes it: uint8 loader batches are moved and normalised here."""
    x = normalize(x.to(device, non_blocking=True)) if x.dtype == torch.uint8 else x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class TimedBatches:
    """The batches of one epoch as the model takes them (on the device), timed as torchvision's
    `MetricLogger.log_every` times its `data_time`: how long the loop waited for each batch, and how many
    images it took, from the second step on (the first may compile or warm up)."""

    def __init__(self, batches, device: torch.device, channels_last: bool = False):
        self.batches, self.device, self.channels_last = batches, device, channels_last
        self.waited, self.seen, self.start = 0.0, 0, 0.0

    def __iter__(self):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t = time.perf_counter()
        for step, (x, y) in enumerate(self.batches):
            x, y = _inputs(x, self.device, self.channels_last), y.to(self.device, non_blocking=True)
            if step > 0:
                self.waited += time.perf_counter() - t
                self.seen += len(x)
            yield x, y
            if step == 0:  # the first step is done: the clock starts here
                sync()
                self.start = time.perf_counter()
            t = time.perf_counter()

    def rates(self) -> dict:
        """Training images/s and the fraction of the time spent waiting for data, up to now."""
        if not self.seen:
            return {"train_images_per_s": float("nan"), "data_wait_fraction": float("nan")}
        elapsed = time.perf_counter() - self.start
        return {"train_images_per_s": self.seen / elapsed, "data_wait_fraction": self.waited / elapsed}


def train_epoch(model, batches, loss_fn, optimizer, device, amp=False, channels_last=False, progress=None):
    """One pass over the batches: the mean loss, and images/s and data wait as `TimedBatches` measures them.
    `progress(n)`, if given, is told after each step how many images it took."""
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    timed, losses = TimedBatches(batches, device, channels_last), []
    for x, y in timed:
        with autocast:
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if progress:
            progress(len(x))
    mean_loss = torch.stack(losses).mean().item() if losses else float("nan")  # one sync per epoch
    return {"train_loss": mean_loss, **timed.rates()}


@torch.no_grad()
def evaluate(
    model,
    batches,
    device,
    num_classes: int,
    amp=False,
    channels_last=False,
    keep=0,
    samples=1,
    mc_batch=MC_BATCH,
):
    """(meter, examples): the confusion matrix and BF sums over the batches, on the device; logits are
    upsampled to the label's full size. `examples` holds up to `keep` (uint8 image, prediction, label)
    triples on the CPU for overlays. Void is label K = num_classes, as shards store it. Call
    `meter.all_reduce()` under DDP before `meter.compute()`. With `samples` > 1, Bayesian SegNet: each image's
    labels are the argmax of the mean softmax of that many dropout samples (segnet.bayesian, `mc_batch` per
    pass), and the meter also keeps their calibration (ECE, accuracy against uncertainty)."""
    model.eval()
    meter = SegmentationMeter(num_classes, device=device, calibrated=samples > 1)
    examples = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for x, y in batches:
        xf = _inputs(x, device, channels_last)
        with autocast:
            out = model(xf).float() if samples == 1 else mc_softmax(model, xf, samples, mc_batch)
        first = 0
        for scored, labels in _at_label_size(out, y, device):
            pred = scored.argmax(1)
            if samples == 1:
                meter.update(pred, labels)
            else:
                meter.update(pred, labels, scored, normalised_entropy(scored))
            for i in range(min(keep - len(examples), len(labels))):
                examples.append((_as_uint8(x[first + i]).cpu(), pred[i].cpu(), labels[i].cpu()))
            first += len(labels)
    return meter, examples


def _at_label_size(out, y, device):
    """(output, labels) on the device, the output (logits or the mean softmax) upsampled bilinearly to the
    labels' size: the whole batch at once, or an image at a time when labels of mixed sizes come as a list."""
    parts = [(out, y)] if torch.is_tensor(y) else [(out[i : i + 1], t[None]) for i, t in enumerate(y)]
    for o, t in parts:
        t = t.to(device, non_blocking=True)
        if o.shape[-2:] != t.shape[-2:]:
            o = F.interpolate(o, size=t.shape[-2:], mode="bilinear", align_corners=False)
        yield o, t


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """A batch element as a uint8 3xHxW picture (device batches are already normalised floats)."""
    if x.dtype == torch.uint8:
        return x
    mean = torch.tensor(MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(3, 1, 1)
    return ((x.float() * std + mean) * 255).round().clamp(0, 255).byte()


def scores(meter: SegmentationMeter, classes, prefix: str = "val_") -> dict:
    """G, C, mIoU, BF and per-class IoU (`iou_<class>`, in the order of the dataset's `classes`), named as
    they are logged; with a calibrated meter, `ece` and `accuracy_by_uncertainty` (deciles) as well."""
    s = meter.compute()
    out = {
        f"{prefix}global_accuracy": s["global_accuracy"],
        f"{prefix}class_accuracy": s["class_accuracy"],
        f"{prefix}miou": s["miou"],
        f"{prefix}bf": s["bf"],
    }
    for name, iou in zip(classes, s["per_class_iou"], strict=True):
        out[f"{prefix}iou_{name}"] = iou
    for key in ("ece", "accuracy_by_uncertainty"):
        if key in s:
            out[f"{prefix}{key}"] = s[key]
    return out


def format_scores(result: dict) -> str:
    """`segnet evaluate`'s report: the scores, then each class's IoU (the `iou_<class>` keys, in order), then
    the calibration of Monte Carlo samples when there is one."""
    names = [key[len("iou_") :] for key in result if key.startswith("iou_")]
    width = max([12, *(len(n) + 2 for n in names)])
    lines = [
        f"{result['split']}: G {result['global_accuracy']:.4f}  C {result['class_accuracy']:.4f}  "
        f"mIoU {result['miou']:.4f}  BF {result['bf']:.4f}",
        f"{'class':<{width}} {'IoU':>7}",
    ]
    for name in names:
        iou = result[f"iou_{name}"]
        lines.append(f"{name:<{width}} {iou:>7.4f}" if iou == iou else f"{name:<{width}} {'absent':>7}")
    if "ece" in result:
        lines.append(f"{result['mc_samples']} Monte Carlo samples: ECE {result['ece']:.4f} ({ECE_BINS} bins)")
        lines.append("pixel accuracy by uncertainty decile, least uncertain first:")
        lines.append("  " + " ".join(f"{a:.3f}" for a in result["accuracy_by_uncertainty"]))
    return "\n".join(lines)
