"""SegNet-Basic and the decoder variants of the paper's Table 1 (Sec. 4.1), on one shared encoder.

Every variant has the SegNet-Basic encoder: 4 blocks of a 7x7 conv with 64 channels, batch norm, ReLU and
2x2 max pooling. They differ only in how the decoder gets back to full resolution, which is the paper's
point: what the decoder keeps from the encoder (the storage multiplier) against what it achieves.

`dropout=P` makes each of them Bayesian SegNet-Basic (Kendall, Badrinarayanan, Cipolla, BMVC 2017), in the
placement its Table 1 calls "Central Enc-Dec": dropout after the deepest half of the encoders and decoders.
With 4 of each, that is on the pooled outputs of encoders 3 and 4 and on the outputs of decoders 4 and 3 (the
first two on the way up), where the authors' bayesian_segnet_basic_train.prototxt (SegNet-Tutorial) has
`encdrop3`, `encdrop4`, `decdrop4` and `decdrop3`. Dropout has no parameters: the state dict is the same
with and without it.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from segnet.layers import check_input_size, conv_bn, dropout_layer, he_init, pool, unpool

WIDTH = 64
KERNEL = 7
DEPTH = 4
CENTRAL = range(DEPTH // 2, DEPTH)  # Bayesian SegNet-Central: encoders 3 and 4 (0-based 2, 3), decoders 4, 3


class BasicEncoder(nn.Module):
    """Returns the pooled output and, per block, its pre-pool features, pooling indices and size; the
    central blocks' pooled outputs go through dropout (when `dropout` > 0)."""

    def __init__(self, in_channels: int, dropout: float = 0.0):
        super().__init__()
        chans = [in_channels] + [WIDTH] * DEPTH
        self.blocks = nn.ModuleList(conv_bn(chans[i], chans[i + 1], KERNEL) for i in range(DEPTH))
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor):
        check_input_size(x.shape[-2], x.shape[-1], DEPTH)
        features, pooled = [], []
        for i, block in enumerate(self.blocks):
            f = block(x)
            x, idx, size = pool(f)
            if i in CENTRAL:
                x = self.dropout(x)
            features.append((f, idx, size))
            pooled.append(x)
        return x, features, pooled


class SegNetBasic(nn.Module):
    """SegNet-Basic: each decoder unpools by the matching encoder's indices, then a 7x7 conv + BN, no ReLU.

    Options select the Table 1 variants that share this decoder shape:
    `encoder_addition` adds the encoder's 64 feature maps after unpooling (SegNet-Basic-EncoderAddition);
    `single_channel` makes each decoder filter see one channel (depthwise, SegNet-Basic-SingleChannelDecoder).
    """

    num_pools: ClassVar[int] = DEPTH  # segnet.models.SegmentationModel: the contract of every model
    storage_multiplier: int

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder_addition: bool = False,
        single_channel: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.encoder = BasicEncoder(in_channels, dropout)
        self.dropout = dropout_layer(dropout)
        groups = WIDTH if single_channel else 1
        self.decoders = nn.ModuleList(
            conv_bn(WIDTH, WIDTH, KERNEL, relu=False, groups=groups) for _ in range(DEPTH)
        )
        self.classifier = nn.Conv2d(WIDTH, num_classes, 1)
        self.encoder_addition = encoder_addition
        self.storage_multiplier = WIDTH if encoder_addition else 1
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, features, _ = self.encoder(x)
        for j, (dec, (f, idx, size)) in enumerate(zip(self.decoders, reversed(features))):
            x = unpool(x, idx, size)
            if self.encoder_addition:
                x = x + f
            x = dec(x)
            if DEPTH - 1 - j in CENTRAL:  # decoders 4 and 3
                x = self.dropout(x)
        return self.classifier(x)


class FCNBasic(nn.Module):
    """FCN-Basic: the SegNet-Basic encoder with an FCN decoder (Long et al.), learned upsampling.

    Each of the 4 decoder stages is a 7x7 conv + BN followed by a 4x4 stride-2 transposed conv initialised
    to bilinear weights; the pooled output of the encoder at the stage's new resolution is added, as FCN adds
    pool3/pool4. With `dim_reduction` the encoder maps are first projected to the class count by 1x1 convs,
    so the decoder is num_classes wide; without it the decoder is 64 wide. The last transposed conv maps to
    the classes. The paper leaves the kernel sizes open; this reading gives 0.646M (no addition 0.644M) and
    1.623M (without dim reduction) parameters for 11 classes, against Table 1's 0.65M and 1.625M.
    """

    num_pools: ClassVar[int] = DEPTH  # segnet.models.SegmentationModel
    storage_multiplier: int

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        addition: bool = True,
        dim_reduction: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.encoder = BasicEncoder(in_channels, dropout)
        self.dropout = dropout_layer(dropout)
        width = num_classes if dim_reduction else WIDTH
        self.addition = addition
        # One projection for the bottleneck, and one per skip when the skips are added.
        n_proj = (DEPTH if addition else 1) if dim_reduction else 0
        self.projections = nn.ModuleList(nn.Conv2d(WIDTH, width, 1) for _ in range(n_proj))
        self.decoders = nn.ModuleList(conv_bn(width, width, KERNEL, relu=False) for _ in range(DEPTH))
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(width, width if i < DEPTH - 1 else num_classes, 4, 2, 1, bias=False)
            for i in range(DEPTH)
        )
        if addition:
            self.storage_multiplier = width
        else:
            self.storage_multiplier = 0
        he_init(self)

    def _project(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.projections[i](x) if len(self.projections) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, features, pooled = self.encoder(x)
        x = self._project(0, x)
        skips = pooled[:-1][::-1]  # pooled maps at 1/8, 1/4, 1/2 resolution
        for i, (dec, up) in enumerate(zip(self.decoders, self.upsamplers)):
            size = features[DEPTH - 1 - i][2]  # the resolution this stage returns to
            x = up(dec(x), output_size=size)
            if self.addition and i < DEPTH - 1:
                x = x + self._project(i + 1, skips[i])
            if DEPTH - 1 - i in CENTRAL:  # the stages back to 1/8 and 1/4: decoders 4 and 3
                x = self.dropout(x)
        return x


class BilinearInterpolation(nn.Module):
    """Bilinear-Interpolation: the SegNet-Basic encoder, fixed bilinear upsampling, no learned decoder.

    Upsampling follows the encoder's recorded sizes, stage by stage, then a 1x1 conv classifies: 0.613M
    parameters for 11 classes (Table 1 rounds to 0.625M).
    """

    num_pools: ClassVar[int] = DEPTH  # segnet.models.SegmentationModel
    storage_multiplier: int = 0

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.encoder = BasicEncoder(in_channels, dropout)  # no learned decoder: the encoders' dropout only
        self.classifier = nn.Conv2d(WIDTH, num_classes, 1)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, features, _ = self.encoder(x)
        for _, _, size in reversed(features):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return self.classifier(x)
