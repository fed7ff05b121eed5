"""DenseNet-121/169 and ResNet-18 in plain torch.nn, each wrapped to return logits and CAMs."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dicomai.inference.findings import Task

__all__ = [
    "ARCHITECTURES",
    "BONE_XRAY_LABELS",
    "CHEST_XRAY_LABELS",
    "HEAD_CT_ICH_LABELS",
    "ArchitectureSpec",
    "CamClassifier",
    "CompatReport",
    "densenet121",
    "densenet169",
    "load_state_dict_compat",
    "resnet18",
]


class CamClassifier(nn.Module):
    """A convolutional backbone plus a linear head that also returns class activation maps.

    ``forward(x)`` returns ``(logits, cams)``: ``logits`` [B, L] are the usual
    global-average-pool + linear outputs; ``cams`` [B, L, h, w] are the final feature map
    contracted with the classifier weights, plus the bias, so that the mean of ``cams`` over
    ``h, w`` equals ``logits`` (up to float rounding).

    Parameters
    ----------
    features
        Module mapping [B, 3, H, W] to a non-negative feature map [B, C, h, w] (the final
        activation included).
    classifier
        ``nn.Linear(C, L)``.
    """

    def __init__(self, features: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B, L] and class activation maps [B, L, h, w] for images [B, 3, H, W]."""
        feats = self.features(x)
        logits = self.classifier(torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1))
        cams = torch.einsum("bchw,lc->blhw", feats, self.classifier.weight)
        cams = cams + self.classifier.bias[None, :, None, None]
        return logits, cams


# --------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False
        )
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class _DenseBlock(nn.ModuleDict):
    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _name, layer in self.items():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            num_input_features, num_output_features, kernel_size=1, stride=1, bias=False
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def _densenet(
    block_config: tuple[int, ...],
    num_classes: int,
    *,
    growth_rate: int = 32,
    num_init_features: int = 64,
    bn_size: int = 4,
) -> CamClassifier:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        [
            ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]
    )
    num_features = num_init_features
    for i, num_layers in enumerate(block_config):
        layers[f"denseblock{i + 1}"] = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
        num_features += num_layers * growth_rate
        if i != len(block_config) - 1:
            layers[f"transition{i + 1}"] = _Transition(num_features, num_features // 2)
            num_features //= 2
    layers["norm5"] = nn.BatchNorm2d(num_features)
    layers["relu5"] = nn.ReLU(inplace=True)  # torchvision applies this in forward()
    model = CamClassifier(nn.Sequential(layers), nn.Linear(num_features, num_classes))
    for m in model.modules():  # torchvision's DenseNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0.0)
    return model


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError('Argument "num_classes" must be an int.')
    if num_classes < 1:
        raise ValueError('Argument "num_classes" must be positive.')


def densenet121(num_classes: int) -> CamClassifier:
    """DenseNet-121 (growth 32, blocks 6-12-24-16, bn_size 4, 64 initial features).

    Parameters
    ----------
    num_classes
        Number of outputs ``L``.

    Returns
    -------
    CamClassifier
        Randomly initialised model; state-dict keys equal torchvision's ``densenet121``.
    """
    _check_num_classes(num_classes)
    return _densenet((6, 12, 24, 16), num_classes)


def densenet169(num_classes: int) -> CamClassifier:
    """DenseNet-169 (growth 32, blocks 6-12-32-32, bn_size 4, 64 initial features).

    Parameters
    ----------
    num_classes
        Number of outputs ``L``.

    Returns
    -------
    CamClassifier
        Randomly initialised model; state-dict keys equal torchvision's ``densenet169``.
    """
    _check_num_classes(num_classes)
    return _densenet((6, 12, 32, 32), num_classes)


# --------------------------------------------------------------------------- ResNet


class _BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class _ResNetFeatures(nn.Module):
    def __init__(self, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(64, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(128, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(256, 512, layers[3], stride=2)
        self.out_channels = 512

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        mods = [_BasicBlock(inplanes, planes, stride)]
        mods += [_BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def resnet18(num_classes: int) -> CamClassifier:
    """ResNet-18 (BasicBlock, layers 2-2-2-2).

    Parameters
    ----------
    num_classes
        Number of outputs ``L``.

    Returns
    -------
    CamClassifier
        Randomly initialised model. Keys are torchvision's under ``features.`` (``conv1``,
        ``bn1``, ``layer1.0.conv1``...), and ``fc`` is ``classifier``;
        :func:`load_state_dict_compat` maps torchvision keys.
    """
    _check_num_classes(num_classes)
    features = _ResNetFeatures((2, 2, 2, 2))
    model = CamClassifier(features, nn.Linear(features.out_channels, num_classes))
    for m in model.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)
    return model


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class ArchitectureSpec:
    """A named architecture, its builder, default labels and task."""

    name: str
    builder: Callable[[int], CamClassifier]
    labels: tuple[str, ...]
    task: Task

    def build(self, num_classes: int | None = None) -> CamClassifier:
        """A fresh model with ``num_classes`` outputs (default: one per default label)."""
        return self.builder(len(self.labels) if num_classes is None else num_classes)


CHEST_XRAY_LABELS = (
    "atelectasis",
    "cardiomegaly",
    "effusion",
    "infiltration",
    "mass",
    "nodule",
    "pneumonia",
    "pneumothorax",
    "consolidation",
    "edema",
    "emphysema",
    "fibrosis",
    "pleural_thickening",
    "hernia",
)
HEAD_CT_ICH_LABELS = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
BONE_XRAY_LABELS = ("abnormal",)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "densenet121": ArchitectureSpec("densenet121", densenet121, CHEST_XRAY_LABELS, Task.CHEST_XRAY),
    "resnet18": ArchitectureSpec("resnet18", resnet18, HEAD_CT_ICH_LABELS, Task.HEAD_CT_ICH),
    "densenet169": ArchitectureSpec("densenet169", densenet169, BONE_XRAY_LABELS, Task.BONE_XRAY),
}


# --------------------------------------------------------------------------- checkpoints

# torchvision's pre-0.3 DenseNet keys: "denselayer1.norm.1.weight" -> "denselayer1.norm1.weight".
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True, slots=True)
class CompatReport:
    """What :func:`load_state_dict_compat` did.

    Attributes
    ----------
    loaded
        Model keys that received a value from the checkpoint.
    classifier_replaced
        Whether the checkpoint's classifier was loaded (its output count matched).
    skipped
        Checkpoint keys that were not used (a mismatched classifier, extra heads).
    """

    loaded: tuple[str, ...]
    classifier_replaced: bool
    skipped: tuple[str, ...] = field(default=())


def _candidates(key: str) -> list[str]:
    while key.startswith("module."):  # nn.DataParallel / DistributedDataParallel
        key = key[len("module.") :]
    match = _OLD_DENSENET_KEY.match(key)
    if match:
        key = match.group(1) + match.group(2)
    parts = key.split(".")
    out: list[str] = []
    for start in range(min(2, len(parts))):  # also without one wrapper prefix ("densenet121.")
        tail = ".".join(parts[start:])
        out.append(tail)
        out.append("features." + tail)  # torchvision ResNet keys live under features.
        for head in ("fc.", "classifier.0.", "classifier.1.", "head.", "last_linear."):
            if tail.startswith(head):
                out.append("classifier." + tail[len(head) :])
    return out


def load_state_dict_compat(model: CamClassifier, state_dict: Mapping[str, Tensor]) -> CompatReport:
    """Load a torchvision-style checkpoint into ``model``.

    Keys may carry ``module.`` or other wrapper prefixes, use torchvision's old DenseNet style
    (``norm.1`` for ``norm1``), or torchvision's ResNet names (``conv1``, ``fc``). The
    classifier is replaced only when the checkpoint's number of outputs equals the model's
    (e.g. an ImageNet head of 1000 outputs is skipped and the model's own head kept).

    Parameters
    ----------
    model
        Model built by one of this module's builders.
    state_dict
        Parameter and buffer tensors by name.

    Returns
    -------
    CompatReport
        The keys loaded and skipped.

    Raises
    ------
    ValueError
        If backbone parameters are missing or shapes differ: the checkpoint is for another
        architecture.
    """
    if not isinstance(model, CamClassifier):
        raise TypeError('Argument "model" must be a CamClassifier.')
    if not isinstance(state_dict, Mapping):
        raise TypeError('Argument "state_dict" must be a mapping of names to tensors.')
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            skipped.append(key)
            continue
        target = next((c for c in _candidates(key) if c in own), None)
        if target is None or target in mapped:
            skipped.append(key)
            continue
        mapped[target] = value
    head = {k: v for k, v in mapped.items() if k.startswith("classifier.")}
    classifier_replaced = (
        bool(head)
        and all(v.shape == own[k].shape for k, v in head.items())
        and set(head) == {"classifier.weight", "classifier.bias"}
    )
    if not classifier_replaced:
        for k in head:
            del mapped[k]
            skipped.append(k)
    bad_shapes = sorted(k for k, v in mapped.items() if v.shape != own[k].shape)
    if bad_shapes:
        raise ValueError(
            f"checkpoint does not fit the architecture: {len(bad_shapes)} tensors differ in "
            f"shape, first {bad_shapes[0]!r}"
        )
    missing = sorted(
        k
        for k in own
        if k not in mapped
        and not k.startswith("classifier.")
        and not k.endswith("num_batches_tracked")  # absent from older checkpoints
    )
    if missing:
        raise ValueError(
            f"checkpoint does not fit the architecture: {len(missing)} tensors missing, "
            f"first {missing[0]!r}"
        )
    model.load_state_dict(mapped, strict=False)
    return CompatReport(
        loaded=tuple(sorted(mapped)),
        classifier_replaced=classifier_replaced,
        skipped=tuple(skipped),
    )
