"""Former home of the models, kept for code that still imports it until the merge of the models/
package; new code imports `hiposeg.models` (the final tree has no model.py)."""

from hiposeg.models import build_segmenter
from hiposeg.models.deeplabv3plus import DECODER_CHANNELS, DeepLabV3Plus
from hiposeg.models.pretrained import load_pretrained_backbone
from hiposeg.models.resnet import BACKBONES, ResNetBackbone
from hiposeg.models.training import HiPoSegNet, ProjectionHead

__all__ = ["BACKBONES", "DECODER_CHANNELS", "DeepLabV3Plus", "HiPoSegNet", "ProjectionHead", "ResNetBackbone",
           "build_segmenter", "load_pretrained_backbone"]
