"""Bayesian SegNet's Monte Carlo dropout (Kendall, Badrinarayanan, Cipolla, BMVC 2017): at test time
dropout stays on, the image goes through the network N times, the labels are the argmax of the mean softmax
and each pixel's uncertainty is the predictive entropy of that mean. Batch norm keeps its running statistics
(eval mode): only the dropout masks vary between samples.
"""

import math
from contextlib import contextmanager

import torch
from torch import nn

from segnet.errors import SegNetError

MAX_MC_SAMPLES = 64  # samples per image, by default: the cost of a request grows with N
MC_BATCH = 8  # samples per forward pass: the memory of sampling is this many images', whatever N is


def has_dropout(model: nn.Module) -> bool:
    """Whether any dropout layer of the model drops something (p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def check_samples(samples: int, limit: int = MAX_MC_SAMPLES, dropout: bool = True, name: str = "the model"):
    """Refuse a sample count below 1 or over `limit`, and more than one sample of a model without dropout
    (its N passes would all be the same pass)."""
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= limit:
        raise SegNetError(f"mc_samples {samples!r}: expected 1 to {limit} (max_mc_samples)")
    if samples > 1 and not dropout:
        raise SegNetError(
            f"mc_samples {samples}: {name} has no dropout (trained with dropout 0), so every sample would be "
            "the same pass; train it with --dropout 0.5 (configs/bayesian.yaml) or use mc_samples 1"
        )


@contextmanager
def dropout_sampling(model: nn.Module):
    """The model in eval mode but for its dropout layers, which sample (train mode); put back on leaving."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)


@torch.no_grad()
def mc_softmax(model: nn.Module, x: torch.Tensor, samples: int, batch: int = MC_BATCH) -> torch.Tensor:
    """The mean softmax of `samples` stochastic passes of each image of x (N, C, H, W) -> (N, K, H, W).
    Each image is repeated into batches of at most `batch` samples, so a pass sees several dropout masks
    at once and memory stays that of `batch` images."""
    if batch < 1:
        raise SegNetError(f"mc_batch {batch}: must be at least 1")
    means = []
    with dropout_sampling(model):
        for image in x:
            total = None
            for start in range(0, samples, batch):
                n = min(batch, samples - start)
                repeated = image.expand(n, *image.shape)
                repeated = repeated.contiguous(memory_format=suggested_format(x))
                probs = model(repeated).float().softmax(1).sum(0)
                total = probs if total is None else total + probs
            means.append(total / samples)
    return torch.stack(means)


def suggested_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC batch (the layout the model was given), else contiguous."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def normalised_entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Predictive entropy -sum p log p over the classes, divided by log K: 0 (one class certain) to 1
    (all K equally likely)."""
    k = probs.shape[dim]
    entropy = -torch.special.xlogy(probs, probs).sum(dim)
    return (entropy / math.log(k)).clamp(0, 1) if k > 1 else torch.zeros_like(entropy)
