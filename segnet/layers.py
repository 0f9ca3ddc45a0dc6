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


def window_position(idx: torch.Tensor, width: int) -> torch.Tensor:
    """The argmax's place in its 2x2 window (0..3), one byte instead of an int64 flat index (Sec. 3: two
    bits per window suffice)."""
    return (((idx // width) % 2) * 2 + (idx % width) % 2).to(torch.int8)


def flat_indices(pos: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Back from window positions to the flat indices that max_unpool2d takes, for an input of `size`."""
    h, w = pos.shape[-2:]
    rows = torch.arange(h, device=pos.device).mul_(2 * size[-1]).view(h, 1)
    cols = torch.arange(w, device=pos.device).mul_(2).view(1, w)
    pos = pos.long()
    return (rows + cols) + (pos // 2) * size[-1] + pos % 2


class _MaxPool(torch.autograd.Function):
    """2x2 max pooling that keeps only the compact window positions for its backward pass."""

    @staticmethod
    def forward(ctx, x):
        y, idx = F.max_pool2d(x, 2, 2, return_indices=True)
        pos = window_position(idx, x.shape[-1])
        ctx.size = x.shape[-2:]
        ctx.save_for_backward(pos)
        ctx.mark_non_differentiable(pos)
        return y, pos

    @staticmethod
    def backward(ctx, grad, _):
        (pos,) = ctx.saved_tensors
        return F.max_unpool2d(grad, flat_indices(pos, ctx.size), 2, 2, output_size=ctx.size)


class _MaxUnpool(torch.autograd.Function):
    """The inverse of `_MaxPool`; its backward gathers the gradient at the same compact positions."""

    @staticmethod
    def forward(ctx, x, pos, size):
        ctx.size = size
        ctx.save_for_backward(pos)
        return F.max_unpool2d(x, flat_indices(pos, size), 2, 2, output_size=size)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        idx = flat_indices(pos, ctx.size).flatten(-2)
        return grad.flatten(-2).gather(-1, idx).view_as(pos), None, None


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
    """Run fn(*args) keeping only its inputs for backward, recomputing the rest then: full-resolution maps
    hold most of a training step's memory, and their convs are a small share of its FLOPs."""
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
