"""Pretrained backbones come from local torchvision files only, checked before loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from hiposeg.config import ModelConfig
from hiposeg.errors import UserError
from hiposeg.models import build_segmenter
from hiposeg.models.deeplabv3plus import DeepLabV3Plus
from hiposeg.models.pretrained import load_pretrained_backbone


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
    assert "a path is read as it is, never downloaded" in str(e.value) and "--pretrained imagenet" in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained_backbone(m, junk)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(UserError, match="state dict"):
        load_pretrained_backbone(m, notdict)


def test_a_non_resnet_state_dict_is_described_as_such(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(UserError, match="does not look like a torchvision ResNet"):
        load_pretrained_backbone(DeepLabV3Plus(3, "resnet18", 16), path)
