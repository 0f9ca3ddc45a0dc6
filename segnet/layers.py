"""Building blocks shared by every SegNet variant: conv units, index-recording pooling, He init."""

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from segnet.errors import SegNetError


def conv_bn(in_ch: int, out_ch: int, kernel: int, relu: bool = True, groups: int = 1) -> nn.Sequential:
    """Conv (no bias: batch norm follows) + BN (+ ReLU), the unit of every SegNet encoder and decoder."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False, groups=groups),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def dropout_layer(p: float) -> nn.Module:
    """Bayesian SegNet's dropout: elementwise, as Caffe's Dropout layer in the authors' models; nothing at 0.
    No parameters, so a model's state dict is the same whatever p is."""
    if not 0 <= p < 1:
        raise SegNetError(f"dropout {p}: expected 0 (off) up to but not including 1")
    return nn.Dropout(p) if p > 0 else nn.Identity()


WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))  # a 2x2 window's cells in row-major order: position 0..3


def _cells(t: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    """The four strided views of t holding each window's cell 0..3 (floor mode: odd edges left out)."""
    return [t[..., a : 2 * h : 2, b : 2 * w : 2] for a, b in WINDOW]


def window_positions(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Where each window's max sits (0..3, int8), the first in row-major order as max_pool2d picks it
    (a window whose max is NaN points at cell 3)."""
    c0, c1, c2, _ = _cells(x, *y.shape[-2:])
    three = torch.full_like(y, 3, dtype=torch.int8)
    pos = torch.where(c2 == y, 2, three)
    pos = torch.where(c1 == y, 1, pos)
    return torch.where(c0 == y, 0, pos).to(torch.int8)


def scatter_windows(v: torch.Tensor, pos: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Each value of v placed at its window position in a zero map of `size` (max unpooling)."""
    h, w = v.shape[-2:]
    fmt = torch.channels_last if _nhwc(v) else torch.contiguous_format
    out = torch.empty(*v.shape[:-2], *size, dtype=v.dtype, device=v.device, memory_format=fmt)
    if tuple(size) != (2 * h, 2 * w):  # floor pooling left an odd edge that no window covers
        out.zero_()
    zero = v.new_zeros(())
    for k, cell in enumerate(_cells(out, h, w)):
        cell.copy_(torch.where(pos == k, v, zero))
    return out


def gather_windows(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The value of t at each window's position (the gradient of max unpooling)."""
    c0, c1, c2, c3 = _cells(t, *pos.shape[-2:])
    return torch.where(pos == 0, c0, torch.where(pos == 1, c1, torch.where(pos == 2, c2, c3)))


def _nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def flat_indices(pos: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The int64 flat indices that max_pool2d returns, from window positions: the encoding's definition."""
    h, w = pos.shape[-2:]
    rows = torch.arange(h, device=pos.device).mul_(2 * size[-1]).view(h, 1)
    cols = torch.arange(w, device=pos.device).mul_(2).view(1, w)
    pos = pos.long()
    return (rows + cols) + (pos // 2) * size[-1] + pos % 2


class _MaxPool(torch.autograd.Function):
    """2x2 max pooling that keeps only the window positions (1 byte each) for its backward pass."""

    @staticmethod
    def forward(ctx, x):
        y = F.max_pool2d(x, 2, 2)
        pos = window_positions(x, y)
        ctx.size = x.shape[-2:]
        ctx.save_for_backward(pos)
        ctx.mark_non_differentiable(pos)
        return y, pos

    @staticmethod
    def backward(ctx, grad, _):
        (pos,) = ctx.saved_tensors
        return scatter_windows(grad, pos, ctx.size)


class _MaxUnpool(torch.autograd.Function):
    """The inverse of `_MaxPool`; its backward gathers the gradient at the same window positions."""

    @staticmethod
    def forward(ctx, x, pos, size):
        ctx.save_for_backward(pos)
        return scatter_windows(x, pos, size)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return gather_windows(grad, pos), None, None


def pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """2x2 stride-2 max pooling that records where each max came from (int8, 2x2 window position) and the
    input size, for unpooling. int64 indices would cost twice the pooled features' own memory."""
    y, pos = _MaxPool.apply(x)
    return y, pos, x.shape[-2:]


def unpool(x: torch.Tensor, pos: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Place each value back where its max came from (zeros elsewhere), at the encoder's recorded size."""
    return _MaxUnpool.apply(x, pos, size)


@contextmanager
def batch_norm_stats_frozen(module: nn.Module):
    """While a checkpointed block is recomputed, its batch norms must not count the batch a second time."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def recomputed(fn, module: nn.Module, *args):
    """Run fn(*args) keeping only its inputs for backward, recomputing the rest then: the largest maps hold
    most of a training step's memory, and their convs are a small share of its FLOPs."""
    from torch.utils.checkpoint import checkpoint

    def contexts():
        return nullcontext(), batch_norm_stats_frozen(module)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """For inference: every conv followed by batch norm becomes one conv with the BN's scale and shift
    folded in (one pass over each map instead of two). Returns a new model in eval mode."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return model


def check_input_size(height: int, width: int, num_pools: int) -> None:
    """Every pooling halves the map (floor): below 2**num_pools a stage would have no pixels left."""
    smallest = 2**num_pools
    if height < smallest or width < smallest:
        raise SegNetError(
            f"input size {height}x{width} is too small: this model pools {num_pools} times, "
            f"so height and width must each be at least {smallest}"
        )


def bilinear_kernel(channels_in: int, channels_out: int, kernel: int) -> torch.Tensor:
    """The weights of a transposed conv that does bilinear upsampling, channel to same channel (FCN init)."""
    factor = (kernel + 1) // 2
    center = factor - 1 if kernel % 2 == 1 else factor - 0.5
    og = torch.arange(kernel, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels_in, channels_out, kernel, kernel)
    for c in range(min(channels_in, channels_out)):
        weight[c, c] = filt
    return weight


def he_init(model: nn.Module) -> None:
    """He (MSRA) initialisation of every conv, as the paper does; learned upsampling starts bilinear."""
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            with torch.no_grad():
                m.weight.copy_(bilinear_kernel(m.in_channels, m.out_channels, m.kernel_size[0]))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
