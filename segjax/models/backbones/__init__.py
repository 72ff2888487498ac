"""ImageNet backbones with torchvision's structure, so its weights load exactly."""

from segjax.models.backbones.resnet import ResNet
from segjax.models.backbones.vgg import VGG16

__all__ = ["ResNet", "VGG16"]
