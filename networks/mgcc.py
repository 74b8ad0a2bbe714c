"""The MGCC segmenter (Tang et al., arXiv 2305.09447, Sec. 3.2 and Fig. 2).

One CNN encoder whose bottleneck is three ConvMixer stages (global context), one main decoder and
three auxiliary decoders of the same architecture. During training each auxiliary decoder sees the
encoder features perturbed at a different depth of the bottleneck:

    x1..x5 = encoder(image)
    aux 1 <- FeatureDropout([x1..x5])   before ConvMixer 1
    x5 = ConvMixer1(x5); aux 2 <- Dropout([x1..x5])
    x5 = ConvMixer2(x5); aux 3 <- FeatureNoise([x1..x5])
    x5 = ConvMixer3(x5); main  <- [x1..x5]

The building blocks are CMU-Net's (Tang et al., ISBI 2023): conv blocks, ConvMixer, multi-scale
attention gates (MSAG). Every convolution has a bias, as in the official code, so that an official
checkpoint loads one-to-one (networks/official.py maps the names).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .perturbations import FeatureDropout, FeatureNoise, AlwaysOnDropout


class Float32Conv2d(nn.Conv2d):
    """A convolution that stays in float32 under autocast (used for the image's first convolution).

    Why: the official normalisation divides by 255 twice, so the image is ~1e-2 while this conv's
    bias is ~1e-1 (PyTorch's default init). In bf16 the bias-dominated output keeps 8 bits, which
    rounds most of the image's signal away before BatchNorm rescales it: 20% relative error after
    the first BatchNorm, and a step gradient with cosine 0.4 to fp32 (benchmarks/check_bf16.py).
    In float32 the step matches fp32 to bf16's usual tolerance. It is ~0.1% of a step's FLOPs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))  # the fp32 master weights under autocast


class ConvBlock(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2. ``first_conv`` is the class of the first convolution."""

    def __init__(self, in_channels: int, out_channels: int, first_conv: type[nn.Conv2d] = nn.Conv2d):
        super().__init__(
            first_conv(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )


class UpConv(nn.Sequential):
    """Nearest-neighbour x2 upsampling -> 3x3 conv -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )


class ConvMixerBlock(nn.Module):
    """One ConvMixer layer: residual(depthwise kxk conv -> GELU -> BN), then 1x1 conv -> GELU -> BN.

    The depthwise convolution with a large kernel mixes space (global context); the pointwise one
    mixes channels.
    """

    def __init__(self, channels: int, kernel_size: int = 7):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels),
            nn.GELU(), nn.BatchNorm2d(channels),
        )
        self.pointwise = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU(), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(x + self.depthwise(x))


class ConvMixerStage(nn.Sequential):
    def __init__(self, channels: int, depth: int = 3, kernel_size: int = 7):
        super().__init__(*[ConvMixerBlock(channels, kernel_size) for _ in range(depth)])


class MSAG(nn.Module):
    """Multi-scale attention gate on a skip feature: x + x * sigmoid(vote(relu([1x1, 3x3, 3x3 dilated 2])))."""

    def __init__(self, channels: int):
        super().__init__()

        def branch(kernel_size: int, dilation: int = 1) -> nn.Sequential:
            padding = dilation * (kernel_size // 2)
            return nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=padding, dilation=dilation),
                                 nn.BatchNorm2d(channels))

        self.pointwise = branch(1)
        self.ordinary = branch(3)
        self.dilated = branch(3, dilation=2)
        self.vote = nn.Sequential(nn.Conv2d(3 * channels, channels, 1), nn.BatchNorm2d(channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = torch.cat([self.pointwise(x), self.ordinary(x), self.dilated(x)], dim=1)
        attention = self.vote(F.relu(scales))
        return x + x * attention


class Encoder(nn.Module):
    """Five conv stages of widths w, 2w, 4w, 8w, 16w with 2x2 max-pooling between them.

    The image's convolution runs in float32 under autocast (see Float32Conv2d).
    """

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        widths = [width * 2 ** i for i in range(5)]
        self.widths = widths
        self.stages = nn.ModuleList([ConvBlock(in_channels, widths[0], first_conv=Float32Conv2d)] + [
            ConvBlock(c_in, c_out) for c_in, c_out in zip(widths[:-1], widths[1:])])
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stages[0](x)]
        for stage in self.stages[1:]:
            features.append(stage(self.pool(features[-1])))
        return features


class Decoder(nn.Module):
    """CMU-Net decoder: MSAG on each skip, four (upsample, concat [skip, up], conv block) steps, 1x1 head."""

    def __init__(self, width: int = 64, num_classes: int = 1):
        super().__init__()
        widths = [width * 2 ** i for i in range(5)]  # x1..x5
        deep_to_shallow = list(reversed(widths))  # 16w, 8w, 4w, 2w, w
        # index j works on the skip of width deep_to_shallow[j + 1]: x4, x3, x2, x1
        self.gates = nn.ModuleList(MSAG(c) for c in deep_to_shallow[1:])
        self.ups = nn.ModuleList(UpConv(c_in, c_out) for c_in, c_out in zip(deep_to_shallow, deep_to_shallow[1:]))
        self.fuses = nn.ModuleList(ConvBlock(2 * c, c) for c in deep_to_shallow[1:])
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        *skips, x = features
        for gate, up, fuse, skip in zip(self.gates, self.ups, self.fuses, reversed(skips)):
            x = fuse(torch.cat([gate(skip), up(x)], dim=1))
        return self.head(x)


class MGCCNet(nn.Module):
    """The MGCC segmenter: encoder + three ConvMixer stages + main and three auxiliary decoders.

    ``model(x)`` returns the main decoder's logits (the inference path, perturbation-free, also used
    by the supervised baseline). ``model(x, with_aux=True)`` runs the training path of the paper and
    returns ``(main_logits, [aux1, aux2, aux3])``; the perturbations are random even in eval mode
    there, as in the official code, where aux 2's dropout is always on.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, num_classes: int = 1, mixer_depth: int = 3,
                 mixer_kernel: int = 7, feature_dropout_range: tuple[float, float] = (0.7, 0.9),
                 dropout_p: float = 0.3, noise_range: float = 0.3):
        super().__init__()
        self.encoder = Encoder(in_channels, width)
        bottleneck = self.encoder.widths[-1]
        self.mixers = nn.ModuleList(ConvMixerStage(bottleneck, mixer_depth, mixer_kernel) for _ in range(3))
        self.main_decoder = Decoder(width, num_classes)
        self.aux_decoders = nn.ModuleList(Decoder(width, num_classes) for _ in range(3))
        # One perturbation per auxiliary decoder, applied before ConvMixer 1, 2 and 3 respectively.
        self.perturbations = nn.ModuleList([
            FeatureDropout(*feature_dropout_range), AlwaysOnDropout(dropout_p), FeatureNoise(noise_range),
        ])

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        features = self.encoder(x)
        *skips, bottleneck = features
        aux_logits = []
        for mixer, perturb, aux_decoder in zip(self.mixers, self.perturbations, self.aux_decoders):
            if with_aux:
                perturbed = [perturb(f) for f in [*skips, bottleneck]]
                aux_logits.append(aux_decoder(perturbed))
            bottleneck = mixer(bottleneck)
        main_logits = self.main_decoder([*skips, bottleneck])
        return (main_logits, aux_logits) if with_aux else main_logits

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The main decoder's input, unperturbed: the skips and the bottleneck after the three ConvMixer
        stages (the "encoder output" where single-level methods such as CCT and UniMatch perturb)."""
        *skips, bottleneck = self.encoder(x)
        for mixer in self.mixers:
            bottleneck = mixer(bottleneck)
        return [*skips, bottleneck]
