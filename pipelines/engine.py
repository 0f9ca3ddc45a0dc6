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
from segnet import CLASSES
from segnet.classes import NUM_CLASSES
from segnet.metrics import SegmentationMeter


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


def train_epoch(model, batches, loss_fn, optimizer, device, amp=False, channels_last=False, progress=None):
    """One pass over the batches. Returns the mean loss, training images/s and the fraction of the epoch
    spent waiting for the next batch (all excluding the first step, which may compile or warm up).
    `progress(n)`, if given, is told after each step how many images it took."""
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, seen, waited, t0 = [], 0, 0.0, None
    it = iter(batches)
    step = 0
    while True:
        t_wait = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        x, y = _inputs(x, device, channels_last), y.to(device, non_blocking=True)
        if step >= 1:
            waited += time.perf_counter() - t_wait
        with autocast:
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if progress:
            progress(len(x))
        if step == 0:
            sync()
            t0 = time.perf_counter()
        else:
            seen += len(x)
        step += 1
    mean_loss = torch.stack(losses).mean().item() if losses else float("nan")  # one sync per epoch
    elapsed = time.perf_counter() - t0 if seen else float("nan")
    return {
        "train_loss": mean_loss,
        "train_images_per_s": seen / elapsed if seen else float("nan"),
        "data_wait_fraction": waited / elapsed if seen else float("nan"),
    }


@torch.no_grad()
def evaluate(model, batches, device, num_classes=NUM_CLASSES, amp=False, channels_last=False, keep=0):
    """(meter, examples): the confusion matrix and BF sums over the batches, on the device; logits are
    upsampled to the label's full size. `examples` holds up to `keep` (uint8 image, prediction, label)
    triples on the CPU for overlays. Call `meter.all_reduce()` under DDP before `meter.compute()`."""
    model.eval()
    meter = SegmentationMeter(num_classes, device=device)
    examples = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for x, y in batches:
        xf, y = _inputs(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast:
            logits = model(xf).float()
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        meter.update(pred, y)
        for i in range(min(keep - len(examples), len(x))):
            examples.append((_as_uint8(x[i]).cpu(), pred[i].cpu(), y[i].cpu()))
    return meter, examples


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """A batch element as a uint8 3xHxW picture (device batches are already normalised floats)."""
    if x.dtype == torch.uint8:
        return x
    mean = torch.tensor(MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(3, 1, 1)
    return ((x.float() * std + mean) * 255).round().clamp(0, 255).byte()


def scores(meter: SegmentationMeter, prefix: str = "val_") -> dict:
    """G, C, mIoU, BF and per-class IoU, named as they are logged."""
    s = meter.compute()
    out = {
        f"{prefix}global_accuracy": s["global_accuracy"],
        f"{prefix}class_accuracy": s["class_accuracy"],
        f"{prefix}miou": s["miou"],
        f"{prefix}bf": s["bf"],
    }
    for name, iou in zip(CLASSES, s["per_class_iou"]):
        out[f"{prefix}iou_{name}"] = iou
    return out
