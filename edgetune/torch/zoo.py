"""Three MobileNetV2-class networks written out in PyTorch: the models of Lin et al., "On-Device
Training Under 256KB Memory" (NeurIPS 2022), with random weights, for planning and exporting
their training on a device (the memory a step needs does not depend on the weights' values).

    from edgetune.torch import from_torch
    from edgetune.torch.zoo import build
    model = build("mbv2-w0.35", classes=10).eval()        # nn.Module, BatchNorm and ReLU6
    backbone = from_torch(model, input_shape=(3, 128, 128))  # about 65 edgetune layers

Every network is a stem convolution, a chain of inverted-residual blocks (1x1 expansion,
k x k depthwise, 1x1 linear projection; a residual add where stride is 1 and the channels
match), a 1x1 convolution, global average pooling and a classifier, each convolution followed
by BatchNorm (folded by ``from_torch``). The block tables:

- ``mbv2-w0.35``: MobileNetV2 (Sandler et al. 2018) at width 0.35, torchvision's rounding of
  channels to multiples of 8 and its 1280-channel last convolution. Exact as published.
- ``mcunet-5fps``: MCUNet-like (Lin et al. 2020): mixed 3/5/7 kernels and expansions 3..6 on
  channels 16..160. MCUNet's searched networks are published as model files, not as tables
  in the papers' text; this table is an approximation of their shape (depth, widths, kernel
  mix), not MCUNet-5fps's exact architecture.
- ``proxyless-w0.3``: ProxylessNAS-Mobile's block table (Cai et al. 2019, its figure of the
  searched mobile network) at width 0.3 (channels rounded as MobileNetV2's). An approximation
  where the figure leaves details open (the last convolution keeps 1280 channels).

The networks' layer counts (convolutions, adds, pooling and the classifier) are 56..76, within
the compiled engine's limit (``edgetune.core.MAX_LAYERS``).
"""
from __future__ import annotations

from . import require_torch

torch = require_torch()
nn = torch.nn

#: (expansion, output channels, repeats, first stride, kernel) per stage, before the width multiplier.
MBV2 = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 4, 2, 3), (6, 96, 3, 1, 3),
        (6, 160, 3, 2, 3), (6, 320, 1, 1, 3)]
#: (expansion, output channels, stride, kernel) per block: an MCUNet-like mix of kernels and expansions.
MCUNET_5FPS = [(1, 8, 1, 3),
               (4, 16, 2, 7), (3, 16, 1, 3),
               (6, 24, 2, 7), (4, 24, 1, 5), (5, 24, 1, 5),
               (5, 40, 2, 3), (5, 40, 1, 7), (4, 40, 1, 5),
               (5, 48, 1, 5), (5, 48, 1, 5),
               (6, 96, 2, 5), (5, 96, 1, 7), (4, 96, 1, 3),
               (5, 160, 1, 7)]
#: ProxylessNAS-Mobile's blocks: (expansion, output channels, stride, kernel).
PROXYLESS_MOBILE = [(1, 16, 1, 3),
                    (3, 32, 2, 5), (3, 32, 1, 3),
                    (3, 40, 2, 7), (3, 40, 1, 3), (3, 40, 1, 5), (3, 40, 1, 5),
                    (6, 80, 2, 7), (3, 80, 1, 5), (3, 80, 1, 5), (3, 80, 1, 5),
                    (6, 96, 1, 5), (3, 96, 1, 5), (3, 96, 1, 5), (3, 96, 1, 5),
                    (6, 192, 2, 7), (6, 192, 1, 7), (3, 192, 1, 7), (3, 192, 1, 7),
                    (6, 320, 1, 7)]

#: name -> (stem channels, blocks (expansion, channels, stride, kernel), last channels, width multiplier)
NETWORKS: dict[str, tuple[int, list[tuple[int, int, int, int]], int, float]] = {
    "mbv2-w0.35": (32, [(t, c, s if i == 0 else 1, k) for t, c, n, s, k in MBV2 for i in range(n)], 1280, 0.35),
    "mcunet-5fps": (16, MCUNET_5FPS, 320, 1.0),
    "proxyless-w0.3": (32, PROXYLESS_MOBILE, 1280, 0.3),
}
#: The input height and width, taken as the paper's setting (docs/mcu_models.md).
RESOLUTION = 128


def make_divisible(v: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor``, never below 90% of ``v`` (MobileNetV2's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Convolution (no bias: BatchNorm's shift is the bias once folded), BatchNorm, ReLU6 or nothing."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (if ``expand`` > 1), k x k depthwise, 1x1 linear
    projection, and the block's input added where the shapes allow (stride 1, same channels)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, kernel, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.conv(x) + x if self.residual else self.conv(x)


class TinyNet(nn.Module):
    """Stem, inverted-residual blocks, a 1x1 convolution, global average pooling, classifier."""

    def __init__(self, stem: int, blocks: list[tuple[int, int, int, int]], last: int, width: float = 1.0,
                 classes: int = 10, in_channels: int = 3):
        super().__init__()
        c = make_divisible(stem * width)
        layers = [conv_bn(in_channels, c, 3, 2)]
        for t, cout, s, k in blocks:
            cout = make_divisible(cout * width)
            layers.append(InvertedResidual(c, cout, t, k, s))
            c = cout
        layers.append(conv_bn(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, classes)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build(name: str, classes: int = 10, *, seed: int = 0, blocks: int | None = None) -> TinyNet:
    """One of ``NETWORKS`` with random weights (seeded) and random BatchNorm statistics, so the
    folded convolutions are not trivially the unfolded ones. ``blocks`` keeps only the first
    ``blocks`` blocks (a smaller network of the same kind, for tests)."""
    from ..errors import UsageError

    if name not in NETWORKS:
        raise UsageError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
    stem, table, last, width = NETWORKS[name]
    torch.manual_seed(seed)
    model = TinyNet(stem, table[:blocks] if blocks else table, last, width, classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(1.0 + 0.2 * torch.rand(m.num_features, generator=g))
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model
