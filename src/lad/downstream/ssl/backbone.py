"""ResNet encoders for ALPNet with torchvision's parameter names (no torchvision dependency).

``ResNet`` reproduces ``torchvision.models.resnet`` (v1.5: stride on the 3x3 convolution) up to
``layer4`` with ``replace_stride_with_dilation`` (DeepLabV3 uses ``[False, True, True]``: output
stride 8), so the ``backbone.*`` tensors of an official torchvision DeepLabV3 checkpoint
(``deeplabv3_resnet101_coco-*.pth``) load into it with the prefix stripped (``load_backbone_weights``).
``width`` (64 in every torchvision model) shrinks the network for CPU tests; only width 64 can load
torchvision weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lad.utils.log import get_logger

__all__ = ["ResNet", "ARCHS", "build_resnet", "load_backbone_weights"]

log = get_logger(__name__)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


ARCHS: dict[str, tuple[type, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """torchvision's ResNet body (``conv1`` .. ``layer4``; no pooling head).

    x: (B, in_channels, H, W) -> (B, out_channels, H / s, W / s) with s = 32 / 2^(number of dilated stages).
    """

    def __init__(self, *, block: type, layers: tuple[int, int, int, int], width: int = 64, in_channels: int = 3,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, True, True)):
        super().__init__()
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, replace_stride_with_dilation[2])
        self.out_channels = width * 8 * block.expansion
        self.output_stride = 32 // 2 ** sum(bool(d) for d in replace_stride_with_dilation)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_resnet(arch: str, *, width: int = 64, output_stride: int = 8, in_channels: int = 3) -> ResNet:
    """``arch`` in ``ARCHS``; ``output_stride`` 8 (DeepLabV3: layer3 and layer4 dilated), 16 or 32."""
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(ARCHS)}")
    dil = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
    if output_stride not in dil:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    block, layers = ARCHS[arch]
    return ResNet(block=block, layers=layers, width=width, in_channels=in_channels, replace_stride_with_dilation=dil[output_stride])


def load_backbone_weights(backbone: ResNet, path: str | Path) -> dict[str, list[str]]:
    """Load a local torchvision checkpoint (a DeepLabV3 / FCN model with ``backbone.*`` keys, or a plain ResNet)
    into ``backbone``. Returns ``{"loaded", "missing", "unexpected", "ignored"}`` key lists.

    Keys of the segmentation head (``classifier.*``, ``aux_classifier.*``) and ``fc.*`` are ignored.
    Raises ``ValueError`` when no backbone tensor matches or a shape differs (a different architecture).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file for the user
            raise ValueError(f"{path}: not a loadable PyTorch state dict ({e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    has_prefix = any(k.startswith("backbone.") for k in state)
    own = backbone.state_dict()
    picked, ignored = {}, []
    for k, v in state.items():
        name = k[len("backbone."):] if has_prefix and k.startswith("backbone.") else (None if has_prefix else k)
        if name is None or name.startswith("fc."):
            ignored.append(k)
            continue
        picked[name] = v
    unexpected = sorted(k for k in picked if k not in own)
    missing = sorted(k for k in own if k not in picked)
    bad = [f"{k}: file {tuple(picked[k].shape)} vs model {tuple(own[k].shape)}" for k in picked if k in own and picked[k].shape != own[k].shape]
    loaded = sorted(k for k in picked if k in own)
    if not loaded:
        raise ValueError(f"{path}: no tensor matches the backbone's parameter names (expected torchvision ResNet names "
                         f"such as backbone.conv1.weight / backbone.layer1.0.conv1.weight); first keys: {list(state)[:5]}")
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor shape(s) differ from the backbone (another ResNet depth or width?): {bad[:3]}")
    backbone.load_state_dict({k: picked[k] for k in loaded}, strict=False)
    if missing:
        log.warning("%s: %d backbone tensors missing from the file (kept at random init): %s", path, len(missing), missing[:8])
    if unexpected:
        log.warning("%s: %d unexpected backbone tensors in the file (not used): %s", path, len(unexpected), unexpected[:8])
    log.info("backbone: loaded %d tensors from %s (%d head tensors ignored)", len(loaded), path, len(ignored))
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "ignored": ignored}
