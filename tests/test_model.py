"""DeepLabV3+ segmenter, the training wrapper's projection head, pretrained loading and export."""

from __future__ import annotations

import pytest
import torch
import torchvision

from hiposeg.config import ModelConfig
from hiposeg.errors import UserError
from hiposeg.model import DeepLabV3Plus, HiPoSegNet, ResNetBackbone, build_segmenter, load_pretrained_backbone


@pytest.fixture(scope="module")
def seg() -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus(7, "resnet18", output_stride=8)


@pytest.mark.parametrize("os_", [8, 16])
def test_shapes_at_every_stage(os_):
    m = DeepLabV3Plus(5, "resnet18", os_).eval()
    with torch.no_grad():
        f = m.forward_features(torch.randn(2, 3, 64, 96))
    assert f["logits"].shape == (2, 5, 64, 96)
    assert f["decoder"].shape == (2, 256, 16, 24)
    assert f["backbone"].shape == (2, 512, 64 // os_, 96 // os_)
    assert m.aspp.convs[1][0].dilation == ((12, 12) if os_ == 8 else (6, 6))
    with torch.no_grad():
        assert m(torch.randn(1, 3, 50, 70)).shape == (1, 5, 50, 70)  # any size; logits at the input size


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
        low, high = ours(x)
    assert low.shape == (1, 256, 12, 12) and torch.equal(high, want)


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


def test_projection_head_is_not_part_of_the_segmenter(seg):
    net = HiPoSegNet(seg, embed_dim=32)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(net) == n(seg) + n(net.projection) and n(net.projection) > 0
    head = {p.data_ptr() for p in net.projection.parameters()} | {b.data_ptr() for b in net.projection.buffers()}
    assert not head & ({p.data_ptr() for p in seg.parameters()} | {b.data_ptr() for b in seg.buffers()})
    assert not any(isinstance(m, type(net.projection)) for m in seg.modules())
    # 256 -> 256 (no bias, BN) -> 32 (bias)
    assert n(net.projection) == 256 * 256 + 2 * 256 + 256 * 32 + 32
    ce_only = HiPoSegNet(seg, with_projection=False)
    assert ce_only.projection is None and n(ce_only) == n(seg)


def test_eval_forward_without_embeddings_never_runs_the_head(seg):
    net = HiPoSegNet(seg, embed_dim=32)
    calls = []
    for m in net.projection.modules():
        m.register_forward_hook(lambda *_: calls.append(1))
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, emb = net(x, with_embeddings=False)
        assert emb is None and not calls
        torch.testing.assert_close(logits, seg(x))
        _, emb = net(x)
    assert calls  # the hooks do fire when the head runs
    assert emb.shape == (1, 32, 16, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1, 16, 16))  # eq. 3


def test_embeddings_are_float32_unit_vectors_under_bf16_autocast_and_can_read_stage_4():
    torch.manual_seed(0)
    net = HiPoSegNet(DeepLabV3Plus(4, "resnet18", 16), embed_dim=16, embed_source="backbone").train()
    assert net.projection.mlp[0].in_channels == 512
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, emb = net(torch.randn(2, 3, 64, 64))
    assert logits.dtype == torch.bfloat16 and emb.dtype == torch.float32
    assert emb.shape == (2, 16, 4, 4)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 4, 4))


# --------------------------------------- pretrained files ---------------------------------------


def test_torchvision_state_dict_loads_and_matches(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    plain = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), plain)
    wrapped = tmp_path / "ddp.pth"  # a DDP + torch.compile checkpoint of the same weights
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in tv.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        m = build_segmenter(ModelConfig(backbone="resnet18", output_stride=16, pretrained=path), num_classes=3)
        got = m.backbone.state_dict()
        for k, v in tv.state_dict().items():
            if not k.startswith("fc."):
                assert torch.equal(got[k], v), k


def test_wrong_architecture_names_the_mismatch_and_what_the_file_is(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(UserError) as e:
        load_pretrained_backbone(DeepLabV3Plus(3, "resnet18", 16), path)
    msg = str(e.value)
    assert str(path) in msg and "resnet18" in msg and "looks like resnet50" in msg
    assert "unexpected keys" in msg and "shape mismatches" in msg and "layer1.0.conv1.weight" in msg
    assert "--backbone" in msg


def test_missing_and_unreadable_files_are_user_errors(tmp_path):
    m = DeepLabV3Plus(3, "resnet18", 16)
    with pytest.raises(UserError, match="does not exist") as e:
        load_pretrained_backbone(m, tmp_path / "nope.pth")
    assert "Nothing is downloaded" in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained_backbone(m, junk)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(UserError, match="state dict"):
        load_pretrained_backbone(m, notdict)


def test_unknown_backbone_and_stride_are_refused():
    with pytest.raises(ValueError, match="resnet34"):
        DeepLabV3Plus(3, "resnet34")
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3Plus(3, "resnet18", 32)
    with pytest.raises(ValueError, match="embed_source"):
        HiPoSegNet(DeepLabV3Plus(3, "resnet18", 16), embed_source="aspp")


def test_a_non_resnet_state_dict_is_described_as_such(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(UserError, match="does not look like a torchvision ResNet"):
        load_pretrained_backbone(DeepLabV3Plus(3, "resnet18", 16), path)
