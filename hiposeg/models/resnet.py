"""torchvision ResNets as segmentation backbones: stage-1 and stage-4 features, stride 8 or 16.

No weights are ever downloaded: every torchvision constructor gets `weights=None`; a pretrained
backbone comes from a local file (`models/pretrained.py`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18, resnet50, resnet101
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

BACKBONES = {"resnet18": resnet18, "resnet50": resnet50, "resnet101": resnet101}
OUTPUT_STRIDES = (8, 16)


def _dilate_stage(stage: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Trade the stage's stride 2 for dilation, exactly as torchvision's `replace_stride_with_dilation`:
    the first block keeps the previous dilation, the others take the new one. Only conv hyper-parameters
    change, so parameter names and shapes (and pretrained files) stay valid. Done by hand because
    torchvision refuses dilation in ResNet-18's BasicBlock."""
    for i, block in enumerate(stage):
        d = previous_dilation if i == 0 else dilation
        for conv in (block.conv1, block.conv2) if isinstance(block, BasicBlock) else (block.conv2,):
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, returning the (stage-1, stage-3, stage-4) features: the
    decoder's low-level input, the auxiliary head's input, the ASPP's input.

    Submodule names equal torchvision's (conv1, bn1, layer1..layer4), so a torchvision ResNet state
    dict minus `fc.*` loads as is. Output stride 16 dilates layer4; output stride 8 layer3 and layer4.
    """

    def __init__(self, name: str = "resnet101", output_stride: int = 8) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        net: ResNet = BACKBONES[name](weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if output_stride == 8:
            _dilate_stage(self.layer3, dilation=2, previous_dilation=1)
            _dilate_stage(self.layer4, dilation=4, previous_dilation=2)
        else:
            _dilate_stage(self.layer4, dilation=2, previous_dilation=1)
        expansion = Bottleneck.expansion if isinstance(self.layer1[0], Bottleneck) else BasicBlock.expansion
        self.low_level_channels = 64 * expansion
        self.stage3_channels = 256 * expansion
        self.out_channels = 512 * expansion

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)  # stride 4
        stage3 = self.layer3(self.layer2(low))
        return low, stage3, self.layer4(stage3)
