"""Building blocks shared by every SegNet variant: conv units, index-recording pooling, He init."""

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


def pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """2x2 stride-2 max pooling that records the argmax indices and the input size for unpooling."""
    size = x.shape[-2:]
    y, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    return y, idx, size


def unpool(x: torch.Tensor, idx: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Place each value back where its max came from (zeros elsewhere), at the encoder's recorded size."""
    return F.max_unpool2d(x, idx, 2, 2, output_size=size)


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
