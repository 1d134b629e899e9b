"""The segmenter interface, DeepLabV3+ as its first family, the one builder, and the training wrapper
that reads the segmenter through that interface only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from hiposeg.config import ModelConfig
from hiposeg.errors import UserError
from hiposeg.models import FAMILIES, PROGRAM_OPS, Segmenter, arch_config, arch_record, build_segmenter
from hiposeg.models.deeplabv3plus import DeepLabV3Plus
from hiposeg.models.resnet import ResNetBackbone
from hiposeg.models.training import HiPoSegNet

# "name shape" of every state-dict entry of files written earlier: "deeplabv3plus-separable-*" is the
# DeepLabV3+ every checkpoint and exported model holds since the separable model, "projection-*" the
# projection head since hiposeg/model.py; files load only if these stay the same. "deeplabv3plus-resnet*"
# is the plain DeepLabV3+ of earlier versions, whose files are refused by name (test_deeplabv3plus.py).
# Never regenerate this file from the current code.
EARLIER_KEYS = json.loads((Path(__file__).parent / "fixtures" / "state_dict_keys.json").read_text())


def names_and_shapes(state: dict[str, Tensor]) -> list[str]:
    return [f"{k} {'x'.join(map(str, v.shape))}" for k, v in state.items()]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def seg() -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus(7, "resnet18", output_stride=8)


# ------------------------------------------------------------------------------------------
# The segmenter and its builder
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("os_", [8, 16])
def test_features_of_the_interface_at_every_stage(os_):
    m = build_segmenter(ModelConfig(backbone="resnet18", output_stride=os_), 5).eval()
    assert isinstance(m, Segmenter) and (m.num_classes, m.decoder_channels, m.backbone_channels) == (5, 256, 512)
    assert m.aux_channels == 256
    with torch.no_grad():
        f = m.forward_features(torch.randn(2, 3, 64, 96))
    assert f["logits"].shape == (2, 5, 64, 96)
    assert f["decoder"].shape == (2, m.decoder_channels, 16, 24)
    assert f["backbone"].shape == (2, m.backbone_channels, 64 // os_, 96 // os_)
    assert f["aux"].shape == (2, m.aux_channels, 64 // min(os_, 16), 96 // min(os_, 16))  # stage 3: stride 8 or 16
    assert m.aspp.branches[1].depthwise.dilation == ((12, 12) if os_ == 8 else (6, 6))
    with torch.no_grad():
        assert m(torch.randn(1, 3, 50, 70)).shape == (1, 5, 50, 70)  # any size; logits at the input size


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_state_dict_names_and_shapes_are_those_of_earlier_checkpoints(backbone):
    for os_ in (8, 16):  # the stride changes dilations, never names or shapes
        m = build_segmenter(ModelConfig(backbone=backbone, output_stride=os_), 15)
        assert names_and_shapes(m.state_dict()) == EARLIER_KEYS[f"deeplabv3plus-separable-{backbone}"], os_


@pytest.mark.parametrize("source, backbone", [("decoder", "resnet18"), ("backbone", "resnet50")])
def test_projection_head_names_and_shapes_are_those_of_earlier_checkpoints(source, backbone):
    net = HiPoSegNet(build_segmenter(ModelConfig(backbone=backbone, output_stride=16), 15), embed_dim=32,
                     embed_source=source)
    assert names_and_shapes(net.projection.state_dict()) == EARLIER_KEYS[f"projection-{source}-{backbone}"]


def test_the_arch_record_rebuilds_the_same_segmenter_through_the_one_builder():
    cfg = ModelConfig(backbone="resnet50", output_stride=8, embed_dim=64, pretrained=None)
    cfg = cfg.model_copy(update={"decoder_channels": 64})
    record = arch_record(cfg, 9)
    assert record == {"name": "deeplabv3plus", "backbone": "resnet50", "output_stride": 8, "decoder_channels": 64,
                      "head": "separable", "num_classes": 9}
    rebuilt_cfg, num_classes = arch_config(json.loads(json.dumps(record)), Path("m.pt"))  # as stored in a file
    assert (rebuilt_cfg.backbone, rebuilt_cfg.output_stride, rebuilt_cfg.decoder_channels, num_classes) == (
        "resnet50", 8, 64, 9)
    a, b = build_segmenter(cfg, 9), build_segmenter(rebuilt_cfg, num_classes)
    assert names_and_shapes(a.state_dict()) == names_and_shapes(b.state_dict())
    assert b.backbone.layer3[1].conv2.dilation == (2, 2)  # output stride 8 kept
    with pytest.raises(UserError, match="holds a 'maskformer' model, a family this hiposeg does not know"):
        arch_config({**record, "name": "maskformer"}, Path("m.pt"))
    with pytest.raises(UserError, match="(?s)malformed field 'arch'.*'resnet50' is not a hrnet variant"):
        arch_config({**record, "name": "hrnet"}, Path("m.pt"))


def test_program_operators_are_the_union_of_the_families():
    assert PROGRAM_OPS == frozenset().union(*(f.program_ops for f in FAMILIES.values()))
    assert "torch.ops.aten.conv2d.default" in FAMILIES["deeplabv3plus"].program_ops


@pytest.mark.parametrize("os_,dilate", [(8, [False, True, True]), (16, [False, False, True])])
def test_dilated_backbone_equals_torchvision_replace_stride_with_dilation(os_, dilate):
    """For Bottleneck ResNets torchvision can dilate itself: ours must be the same network."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate).eval()
    ours = ResNetBackbone("resnet50", os_).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        want = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        low, stage3, high = ours(x)
    assert low.shape == (1, 256, 12, 12) and stage3.shape == (1, 1024, 6 if os_ == 8 else 3, 6 if os_ == 8 else 3)
    assert torch.equal(high, want)


def test_export_with_dynamic_height_and_width_matches_eager(seg):
    seg.eval()
    H, W = torch.export.Dim("H", min=32, max=1024), torch.export.Dim("W", min=32, max=1024)
    ep = torch.export.export(seg, (torch.randn(1, 3, 64, 96),), dynamic_shapes={"x": {2: H, 3: W}})
    exported = ep.module()
    for size in ((64, 96), (96, 128)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            want, got = seg(x), exported(x)
        assert got.shape == (1, 7, *size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_channels_last_gives_the_same_logits(seg):
    seg.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = seg(x)
        cl = DeepLabV3Plus(7, "resnet18", 8).eval()
        cl.load_state_dict(seg.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        got = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_backbone_stride_and_embedding_source_are_refused():
    with pytest.raises(ValueError, match="resnet34"):
        DeepLabV3Plus(3, "resnet34")
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3Plus(3, "resnet18", 32)
    with pytest.raises(ValueError, match="embed_source"):
        HiPoSegNet(DeepLabV3Plus(3, "resnet18", 16), embed_source="aspp")


# ------------------------------------------------------------------------------------------
# The training wrapper: projection head g_phi on the interface's features
# ------------------------------------------------------------------------------------------


class TinyFamily(Segmenter):
    """Another family in miniature: a decoder of 8 channels at stride 4, a 'backbone' of 12."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes, self.decoder_channels, self.backbone_channels = 3, 8, 12
        self.stem = nn.Conv2d(3, 12, 3, stride=4, padding=1)
        self.decode = nn.Conv2d(12, 8, 1)
        self.classify = nn.Conv2d(8, 3, 1)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        backbone = self.stem(x)
        decoder = self.decode(backbone)
        logits = nn.functional.interpolate(self.classify(decoder), size=x.shape[-2:], mode="bilinear")
        return {"logits": logits, "decoder": decoder, "backbone": backbone}


@pytest.mark.parametrize("source, channels", [("decoder", 8), ("backbone", 12)])
def test_the_training_wrapper_needs_only_the_segmenter_interface(source, channels):
    net = HiPoSegNet(TinyFamily(), embed_dim=4, embed_source=source)
    assert net.projection.mlp[0].in_channels == channels
    logits, emb, aux = net(torch.randn(2, 3, 32, 40))
    assert logits.shape == (2, 3, 32, 40) and emb.shape == (2, 4, 8, 10) and aux is None


def test_projection_head_is_not_part_of_the_segmenter(seg):
    net = HiPoSegNet(seg, embed_dim=32)
    assert n_params(net) == n_params(seg) + n_params(net.projection) and n_params(net.projection) > 0
    head = {p.data_ptr() for p in net.projection.parameters()} | {b.data_ptr() for b in net.projection.buffers()}
    assert not head & ({p.data_ptr() for p in seg.parameters()} | {b.data_ptr() for b in seg.buffers()})
    assert not any(isinstance(m, type(net.projection)) for m in seg.modules())
    # 256 -> 256 (no bias, BN) -> 32 (bias)
    assert n_params(net.projection) == 256 * 256 + 2 * 256 + 256 * 32 + 32
    ce_only = HiPoSegNet(seg, with_projection=False)
    assert ce_only.projection is None and n_params(ce_only) == n_params(seg)


def test_eval_forward_without_embeddings_never_runs_the_head(seg):
    net = HiPoSegNet(seg, embed_dim=32)
    calls = []
    for m in net.projection.modules():
        m.register_forward_hook(lambda *_: calls.append(1))
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, emb, aux = net(x, with_embeddings=False)
        assert emb is None and aux is None and not calls
        torch.testing.assert_close(logits, seg(x))
        _, emb, _ = net(x)
    assert calls  # the hooks do fire when the head runs
    assert emb.shape == (1, 32, 16, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1, 16, 16))  # eq. 3


def test_embeddings_are_float32_unit_vectors_under_bf16_autocast_and_can_read_stage_4():
    torch.manual_seed(0)
    net = HiPoSegNet(DeepLabV3Plus(4, "resnet18", 16), embed_dim=16, embed_source="backbone").train()
    assert net.projection.mlp[0].in_channels == 512
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, emb, _ = net(torch.randn(2, 3, 64, 64))
    assert logits.dtype == torch.bfloat16 and emb.dtype == torch.float32
    assert emb.shape == (2, 16, 4, 4)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 4, 4))
