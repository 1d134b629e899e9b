"""The model families beyond DeepLabV3+ (paper Table 9): HRNetV2 on timm's HRNet, and SegFormer, FPN,
U-Net from segmentation_models_pytorch behind one adapter. Every family implements the segmenter
interface at every variant, at any input size, and is chosen and validated through the config and
CLI; without the optional `models` extra a user gets a one-line install hint.

Through the engine (train, resume, export, predict, DDP): tests/test_families_runs.py."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import fails_with, squash
from hiposeg.config import ModelConfig, build_config
from hiposeg.errors import UserError
from hiposeg.models import FAMILIES, Segmenter, build_segmenter
from hiposeg.models.training import HiPoSegNet

# (family, smallest variant tested here) for every family beyond DeepLabV3+; FPN on an EfficientNet
# encoder, U-Net on a ResNet one.
SMALL = {"hrnet": "hrnet_w18_small", "segformer": "mit_b0", "fpn": "efficientnet-b0", "unet": "resnet18"}
# (decoder channels, backbone channels), independently known: HRNetV2 concatenates the four branches
# (W18-small: 16+32+64+128, W48: 48+96+192+384); SegFormer's MLP decoder is 256 wide on MiT's last
# stage of 256 (B0) or 512 (B1-B5); smp's FPN segmentation branches are 128 wide, U-Net's last
# decoder block has 16 channels.
CHANNELS = {("hrnet", "hrnet_w18_small"): (240, 128), ("hrnet", "hrnet_w48"): (720, 384),
            ("segformer", "mit_b0"): (256, 256), ("segformer", "mit_b5"): (256, 512),
            ("fpn", "efficientnet-b0"): (128, 320), ("fpn", "resnet50"): (128, 2048),
            ("unet", "resnet18"): (16, 512), ("unet", "efficientnet-b7"): (16, 640),
            ("deeplabv3plus", "resnet18"): (256, 512), ("deeplabv3plus", "resnet101"): (256, 2048)}
META_UNSUPPORTED = {"segformer"}  # MiT's constructor calls .item() on a tensor, which meta tensors cannot


def small(family: str, classes: int = 5) -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter(ModelConfig(name=family, backbone=SMALL[family]), classes).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_variant_builds_with_the_interface(family):
    """Every --backbone choice builds (without allocating weights where torch can: on the meta device)."""
    fam = FAMILIES[family]
    variants = fam.variants if family not in META_UNSUPPORTED else (fam.variants[0], fam.default_variant)
    for variant in variants:
        with torch.device("meta" if family not in META_UNSUPPORTED else "cpu"):
            m = build_segmenter(ModelConfig(name=family, backbone=variant), 7)
        assert isinstance(m, Segmenter) and m.num_classes == 7, variant
        if (family, variant) in CHANNELS:
            assert (m.decoder_channels, m.backbone_channels) == CHANNELS[(family, variant)], variant
    assert fam.default_variant in fam.variants


@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("size", [(64, 64), (97, 161), (33, 47)])
def test_features_at_any_input_size(family, size):
    m = small(family)
    h, w = size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        f = m.forward_features(x)
        plain = m(x)
    assert f["logits"].shape == (2, 5, h, w) and torch.equal(plain, f["logits"])
    assert f["decoder"].shape == (2, m.decoder_channels, -(-h // 4), -(-w // 4))  # stride 4 in every family
    assert f["backbone"].shape == (2, m.backbone_channels, -(-h // 32), -(-w // 32))


@pytest.mark.parametrize("family", ["hrnet", "fpn"])
def test_inputs_their_library_cannot_take_are_padded_and_cropped(family):
    """timm's HRNet and smp's FPN line their pyramids up on sides that are multiples of 32 only: an
    odd input gives the logits of its zero-padded copy, cropped."""
    m = small(family)
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        want = m(F.pad(x, (0, 96 - 70, 0, 64 - 50)))[..., :50, :70]
        got = m(x)
    assert FAMILIES[family].input_multiple == 32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("family, architecture", [("segformer", "Segformer"), ("fpn", "FPN"), ("unet", "Unet")])
def test_the_smp_adapter_returns_smps_own_forward(family, architecture):
    """On inputs smp accepts, the adapter's logits are exactly smp's model's (same module, same
    weights); the family's input multiple is smp's own rule."""
    import segmentation_models_pytorch as smp

    m = small(family)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(m(x), m.model(x))
    assert getattr(smp, architecture).requires_divisible_input_shape == (FAMILIES[family].input_multiple == 32)
    assert all(k.startswith("model.") for k in m.state_dict())  # smp's names under model.


def test_hrnetv2_head_reads_the_raw_branches_not_the_classification_features():
    """timm's default HRNet features are the classification "incre" modules (W18-small: 128, 256,
    512, 1024 channels); the HRNetV2 head concatenates the four raw branches (16, 32, 64, 128)."""
    import timm

    m = small("hrnet")
    default = timm.create_model("hrnet_w18_small", features_only=True, out_indices=(1, 2, 3, 4))
    assert default.feature_info.channels() == [128, 256, 512, 1024]
    assert m.backbone.feature_info.channels() == [16, 32, 64, 128]
    assert m.fuse[0].in_channels == m.fuse[0].out_channels == m.classifier.in_channels == 240
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        branches = m.backbone(x)
        cat = torch.cat([branches[0]] + [F.interpolate(b, size=(16, 16), mode="bilinear") for b in branches[1:]], 1)
        torch.testing.assert_close(m.forward_features(x)["decoder"], m.fuse(cat))


def test_unet_feeds_the_projection_head_its_decoder_pooled_to_stride_4():
    m = small("unet")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        full = m.model.decoder(m.model.encoder(x))
        feats = m.forward_features(x)
    assert full.shape == (1, 16, 64, 96)  # smp's U-Net decoder ends at the input resolution
    torch.testing.assert_close(feats["decoder"], F.avg_pool2d(full, 4))


@pytest.mark.parametrize("family", list(SMALL))
def test_the_projection_head_reads_the_decoder_feature_and_is_not_part_of_the_segmenter(family):
    m = small(family)
    net = HiPoSegNet(m, embed_dim=16)
    assert net.projection.mlp[0].in_channels == m.decoder_channels
    logits, emb, _ = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5, 64, 64) and emb.shape == (2, 16, 16, 16)
    n = sum(p.numel() for p in net.parameters())
    assert n == sum(p.numel() for p in m.parameters()) + sum(p.numel() for p in net.projection.parameters())


def test_family_and_variant_are_validated_listing_the_choices(tmp_path):
    out = fails_with(["train", "--data", tmp_path, "--model", "maskformer", "--quiet"],
                     "- model.name: 'maskformer' is not a model family; choose one of deeplabv3plus, hrnet, segformer, "
                     "fpn, unet")
    assert "model.backbone" not in out  # the variant is not judged against an unknown family
    fails_with(["train", "--data", tmp_path, "--model", "segformer", "--backbone", "resnet101", "--quiet"],
               "- model.backbone: 'resnet101' is not a segformer variant; choose one of mit_b0, mit_b1, mit_b2, "
               "mit_b3, mit_b4, mit_b5")


@pytest.mark.parametrize("dataset, family, variant", [
    ("synthetic", "segformer", "mit_b0"), ("synthetic", "hrnet", "hrnet_w18_small"), ("synthetic", "deeplabv3plus",
                                                                                       "resnet18"),
    ("cityscapes", "segformer", "mit_b5"), ("cityscapes", "hrnet", "hrnet_w48"), ("cityscapes", "deeplabv3plus",
                                                                                  "resnet101"),
    ("custom", "unet", "resnet50")])
def test_recipes_pick_each_familys_variant_and_pretrained_weights(dataset, family, variant):
    """The CPU-sized synthetic recipe trains each family's smallest variant from random weights; the
    paper recipes its paper-scale one from ImageNet weights; --backbone and --pretrained override both."""
    cfg = build_config({"data": {"dataset": dataset}, "model": {"name": family}})
    assert (cfg.model.backbone, cfg.model.pretrained) == (variant, "imagenet" if dataset == "cityscapes" else None)
    given = build_config({"data": {"dataset": dataset}, "model": {"name": family, "backbone": FAMILIES[family].variants[1],
                                                                   "pretrained": "none"}})
    assert (given.model.backbone, given.model.pretrained) == (FAMILIES[family].variants[1], None)
    assert given.resolved_out().name == (f"{dataset}-{given.model.backbone}" if family == "deeplabv3plus"
                                         else f"{dataset}-{family}-{given.model.backbone}")


@pytest.mark.parametrize("family, module, package", [("hrnet", "timm", "timm"),
                                                     ("segformer", "segmentation_models_pytorch",
                                                      "segmentation-models-pytorch")])
def test_without_the_models_extra_a_family_asks_for_it_in_one_line(family, module, package, monkeypatch, tmp_path,
                                                                    tiny_data):
    monkeypatch.setitem(sys.modules, module, None)  # `import timm` now fails as if it were not installed
    with pytest.raises(UserError, match=f"the {family} models need the package {package}, which is not installed") as e:
        build_segmenter(ModelConfig(name=family), 3)
    assert e.value.hint == "Install the optional model families: pip install 'hiposeg[models]'  (timm, " \
                           "segmentation-models-pytorch)."
    fails_with(["train", "--data", tiny_data, "--out", tmp_path / "run", "--model", family, "--iters", "1",
                "--workers", "0", "--device", "cpu", "--quiet"], f"need the package {package}", "hiposeg[models]")
    assert not (tmp_path / "run").exists()  # refused before the run directory is created
    monkeypatch.chdir(tmp_path)  # the built-in default: refused before its data set is generated in data/
    fails_with(["train", "--model", family, "--iters", "1", "--device", "cpu", "--quiet"], "hiposeg[models]")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", ["train", "ablate"])
def test_help_at_80_columns_lists_the_families_and_the_extra_to_install(command, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    from hiposeg.cli import app

    r = cli.invoke(app, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= 80, r.output
    for family in FAMILIES:
        assert family in r.output, (family, r.output)
    if command == "train":  # the install hint survives Rich markup ("[models]" is not a style)
        assert squash("pip install 'hiposeg[models]'") in squash(r.output.replace("│", "")), r.output
