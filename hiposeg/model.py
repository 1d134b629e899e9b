"""DeepLabV3+ on a torchvision ResNet, and the training wrapper that adds the projection head g_phi.

Two modules, two jobs (README "The method, as implemented"):

* `DeepLabV3Plus` is the segmentation model and the only thing that is ever exported: backbone,
  ASPP, stride-4 decoder, a classifier over the FINE classes. Coarse predictions are the fine argmax
  mapped through pi, so there is no coarse classifier.
* `HiPoSegNet` wraps it for training and owns the projection head g_phi (eq. 3). Export takes
  `net.segmenter`, so the head is provably absent from the exported model; a CE-only run builds no
  head at all.

No weights are ever downloaded: every torchvision constructor gets `weights=None`, and a pretrained
backbone comes from a local torchvision ResNet state-dict file (`load_pretrained_backbone`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50, resnet101
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP

from hiposeg.config import ModelConfig
from hiposeg.errors import UserError

BACKBONES = {"resnet18": resnet18, "resnet50": resnet50, "resnet101": resnet101}
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}  # DeepLabV3+ paper: rates double when the stride halves
DECODER_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48

# Blocks per stage of the torchvision ResNets, to name the architecture a state-dict file holds.
_RESNET_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


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
    """A torchvision ResNet without avgpool/fc, returning (stage-1 feature, stage-4 feature).

    Submodule names equal torchvision's (conv1, bn1, layer1..layer4), so a torchvision ResNet state
    dict minus `fc.*` loads as is. Output stride 16 dilates layer4; output stride 8 layer3 and layer4.
    """

    def __init__(self, name: str = "resnet101", output_stride: int = 8) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        if output_stride not in ASPP_RATES:
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
        self.out_channels = 512 * expansion

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)  # stride 4
        return low, self.layer4(self.layer3(self.layer2(low)))


class DeepLabV3Plus(nn.Module):
    """torchvision ResNet-18/50/101 backbone, output stride 8 (dilated layer3+4) or 16 (dilated layer4), ASPP
    (torchvision.models.segmentation.deeplabv3.ASPP; rates 12/24/36 at OS8, 6/12/18 at OS16), low-level stage-1
    (layer1) features reduced to 48 ch, fused with the upsampled ASPP output by two 3x3 conv-BN-ReLU (256 ch) at
    stride 4, 1x1 classifier over the FINE classes; logits upsampled (bilinear, align_corners=False) to the input.

    The forward path has no data-dependent control flow, so `torch.export` with dynamic H and W works.
    Note: ASPP's image-pooling branch has a BatchNorm over a 1x1 map, so training needs >= 2 images per
    BatchNorm (per process without SyncBatchNorm), as in torchvision's DeepLabV3.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.output_stride = output_stride
        self.backbone = ResNetBackbone(backbone, output_stride)
        self.aspp = ASPP(self.backbone.out_channels, ASPP_RATES[output_stride], DECODER_CHANNELS)
        self.reduce_low_level = _conv_bn_relu(self.backbone.low_level_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(DECODER_CHANNELS + LOW_LEVEL_CHANNELS, DECODER_CHANNELS, 3),
                                  _conv_bn_relu(DECODER_CHANNELS, DECODER_CHANNELS, 3))
        self.classifier = nn.Conv2d(DECODER_CHANNELS, num_classes, 1)
        for module in (self.aspp, self.reduce_low_level, self.fuse):
            _init_head(module)
        # Small classifier init (mmsegmentation's conv_seg: N(0, 0.01)): the first losses are ~ln K
        # instead of the large values He init gives a layer followed by no nonlinearity.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """{"logits": (B, K, H, W), "decoder": (B, 256, H/4, W/4), "backbone": stage-4 feature (B, C, H/OS, W/OS)}."""
        low, high = self.backbone(x)
        context = self.aspp(high)
        low = self.reduce_low_level(low)
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        decoder = self.fuse(torch.cat([context, low], dim=1))
        logits = F.interpolate(self.classifier(decoder), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "decoder": decoder, "backbone": high}

    def forward(self, x: Tensor) -> Tensor:
        """(B, num_classes, H, W) fine-class logits at the input size."""
        return self.forward_features(x)["logits"]


def _init_head(module: nn.Module) -> None:
    """He init for the new (non-backbone) convs, as torchvision does for ResNet; BN to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_segmenter(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    """The one model builder for training, export and predict; loads `cfg.pretrained` if set."""
    model = DeepLabV3Plus(num_classes, cfg.backbone, cfg.output_stride)
    if cfg.pretrained is not None:
        load_pretrained_backbone(model, Path(cfg.pretrained))
    return model


# --------------------------------------------------------------------------------------------
# Pretrained backbones: a local torchvision ResNet state-dict file, checked before loading.
# --------------------------------------------------------------------------------------------

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _guess_resnet(state: dict[str, Tensor]) -> tuple[str | None, str]:
    """(torchvision name or None, how to describe the file) from the blocks per stage of a state dict."""
    kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "basic"
    blocks = []
    for stage in range(1, 5):
        ids = {k.split(".")[1] for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        blocks.append(len(ids))
    if not any(blocks):
        return None, "does not look like a torchvision ResNet (no layer1..layer4 keys)"
    name = _RESNET_LAYOUTS.get((kind, tuple(blocks)))
    return name, f"looks like {name}" if name else f"looks like an unknown ResNet ({kind} blocks per stage {blocks})"


def load_pretrained_backbone(model: DeepLabV3Plus, path: Path) -> None:
    """Load a local torchvision ResNet state dict (e.g. resnet101-63fe2227.pth) into `model.backbone`.

    `fc.*` is dropped and "module."/"_orig_mod." prefixes are stripped. Any missing file, unreadable
    file or architecture mismatch raises `UserError` naming the file, the mismatching keys/shapes, the
    architecture the file looks like, and the fix.
    """
    path = Path(path)
    want = model.backbone_name
    fix = (f"Pass a torchvision {want} state dict (from torchvision.models.{want}(weights=...).state_dict(), "
           "e.g. the .pth in ~/.cache/torch/hub/checkpoints) with --pretrained, or choose the matching --backbone.")
    if not path.is_file():
        raise UserError(f"pretrained backbone file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""),
                        hint=fix + " Nothing is downloaded: the file must be on this machine.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the same thing to the user
        raise UserError(f"cannot read pretrained backbone file {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint=fix) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"pretrained backbone file {path} does not hold a state dict of tensors "
                        f"(got {type(obj).__name__})", hint=fix)
    state = {_strip_prefixes(k): v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}

    expected = model.backbone.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent from older torchvision files
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        details = [f"{name} {len(items)}: {show(items)}" for name, items in
                   (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
                   if items]
        name, description = _guess_resnet(state)
        if name in BACKBONES:
            fix = f"Use --backbone {name} with this file, or pass a torchvision {want} state dict."
        raise UserError(f"pretrained backbone file {path} does not match backbone {want}; the file {description}."
                        "\n  " + "\n  ".join(details), hint=fix)
    model.backbone.load_state_dict(state, strict=False)  # strict=False only for the optional BN counters


# --------------------------------------------------------------------------------------------
# Training wrapper: segmenter + projection head g_phi (eq. 3).
# --------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """g_phi: conv1x1 -> BN -> ReLU -> conv1x1 (d' = embed_dim), then L2-normalise over channels (eq. 3).

    The ContrastiveSeg/HSSN head. The hidden width is the input width capped at 512 (256 on the decoder
    feature): HSSN's 2048-wide hidden layer on stage 4 would cost ~34 GMAC per 512x1024 image.
    The output is float32 even under autocast: the prototype branch computes in fp32.
    """

    def __init__(self, in_channels: int, embed_dim: int = 256, hidden_channels: int | None = None) -> None:
        super().__init__()
        hidden = hidden_channels or min(in_channels, 512)
        self.mlp = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, embed_dim, 1))
        _init_head(self.mlp)

    def forward(self, x: Tensor) -> Tensor:
        z = self.mlp(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.normalize(z.float(), p=2, dim=1)  # eq. 3


class HiPoSegNet(nn.Module):
    """Training wrapper: segmenter + projection head. The head lives HERE, not in the segmenter, so export =
    `net.segmenter` and stripping is provably complete."""

    def __init__(self, segmenter: DeepLabV3Plus, embed_dim: int = 256, embed_source: str = "decoder",
                 with_projection: bool = True) -> None:
        super().__init__()
        if embed_source not in ("decoder", "backbone"):
            raise ValueError(f"embed_source must be 'decoder' or 'backbone', got {embed_source!r}")
        self.segmenter = segmenter
        self.embed_source = embed_source
        in_channels = DECODER_CHANNELS if embed_source == "decoder" else segmenter.backbone.out_channels
        self.projection: ProjectionHead | None = ProjectionHead(in_channels, embed_dim) if with_projection else None

    def forward(self, x: Tensor, with_embeddings: bool = True) -> tuple[Tensor, Tensor | None]:
        """(logits at input size, L2-normalised float32 embeddings (B, d', h, w) or None).

        Embeddings are None when `with_embeddings` is False or the net was built without a head; then
        the head is not run at all (the plain segmenter forward).
        """
        if not with_embeddings or self.projection is None:
            return self.segmenter(x), None
        feats = self.segmenter.forward_features(x)
        return feats["logits"], self.projection(feats[self.embed_source])
