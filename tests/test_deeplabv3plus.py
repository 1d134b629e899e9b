"""DeepLabV3+ as its paper defines it: atrous separable ASPP and decoder (structure, and the parameter
count against a hand count), the optional auxiliary head (trains, never exported), and files of the
earlier plain DeepLabV3+ refused by name while its programs (.pt2, .onnx) still run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import crafted
from conftest import fails_with
from hiposeg.config import LossConfig, ModelConfig
from hiposeg.export import load_inference_model
from hiposeg.export.common import program_example
from hiposeg.models import FAMILIES, build_segmenter
from hiposeg.models.deeplabv3plus import PROGRAM_OPS, DeepLabV3Plus, SeparableConv
from hiposeg.models.training import HiPoSegNet
from hiposeg.prototypes import HiPoSegCriterion

EARLIER_KEYS = json.loads((Path(__file__).parent / "fixtures" / "state_dict_keys.json").read_text())
F2C = [0, 0, 1, 1, 2, 2, 2]  # 7 fine classes in 3 coarse ones
IGNORE = 255
PLAIN_MODEL_ERROR = "holds a DeepLabV3+ with the plain ASPP and plain 3x3 decoder convolutions"


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def separable_convs(module: nn.Module) -> list[SeparableConv]:
    return [m for m in module.modules() if isinstance(m, SeparableConv)]


# ------------------------------------------------------------------------------------------
# The architecture
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("os_, rates", [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_aspp_and_decoder_are_atrous_separable_convolutions(os_, rates):
    m = DeepLabV3Plus(7, "resnet50", os_)
    aspp, decoder = separable_convs(m.aspp), separable_convs(m.fuse)
    assert (len(aspp), len(decoder), len(separable_convs(m))) == (3, 2, 5)
    assert [s.depthwise.dilation for s in aspp] == [(r, r) for r in rates]
    assert [s.depthwise.dilation for s in decoder] == [(1, 1), (1, 1)]
    for s, cin in zip(aspp + decoder, [2048, 2048, 2048, 256 + 48, 256]):
        dw, pw = s.depthwise, s.pointwise
        # depthwise: one 3x3 filter per channel, padded to keep the size; pointwise: a dense 1x1
        assert (dw.in_channels, dw.out_channels, dw.groups, dw.kernel_size) == (cin, cin, cin, (3, 3))
        assert dw.padding == dw.dilation and dw.bias is None
        assert (pw.in_channels, pw.out_channels, pw.groups, pw.kernel_size) == (cin, 256, 1, (1, 1))
        assert pw.bias is None
        # BN and ReLU after the pointwise convolution only (none between the two convolutions)
        assert [type(layer) for layer in s] == [nn.Conv2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
        assert s.bn.num_features == 256
    low = m.reduce_low_level[0]
    assert (low.in_channels, low.out_channels, low.kernel_size) == (256, 48, (1, 1))  # the paper's 48 channels
    assert m.aspp.project[0][0].in_channels == 5 * 256  # 1x1, three atrous branches, image pooling
    # no dense 3x3 convolution outside the backbone
    head = [c for name, c in m.named_modules() if isinstance(c, nn.Conv2d) and not name.startswith("backbone.")]
    assert head and all(c.kernel_size == (1, 1) or c.groups == c.in_channels for c in head)


def test_decoder_width_is_configurable_and_the_projection_head_reads_it():
    m = build_segmenter(ModelConfig(backbone="resnet18", output_stride=16, decoder_channels=512), 7).eval()
    assert m.decoder_channels == 512
    assert {s.pointwise.out_channels for s in separable_convs(m)} == {512}
    assert m.fuse[0].depthwise.in_channels == 512 + 48 and m.classifier.in_channels == 512
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 64, 64))["decoder"].shape == (1, 512, 16, 16)
    assert HiPoSegNet(m, embed_dim=32).projection.mlp[0].in_channels == 512


def hand_count(backbone: int, c4: int, c1: int, w: int, k: int) -> int:
    """Parameters of DeepLabV3+ counted by hand from the paper's layers: stage-4 channels c4, stage-1
    channels c1, ASPP/decoder width w, k classes (BN: a weight and a bias per channel)."""
    def conv_bn(cin: int, cout: int) -> int:  # 1x1 conv (no bias) + BN
        return cin * cout + 2 * cout

    def separable(cin: int, cout: int) -> int:  # depthwise 3x3 + pointwise 1x1 + BN
        return cin * 9 + cin * cout + 2 * cout

    aspp = conv_bn(c4, w) + 3 * separable(c4, w) + conv_bn(c4, w) + conv_bn(5 * w, w)
    decoder = conv_bn(c1, 48) + separable(w + 48, w) + separable(w, w)
    return backbone + aspp + decoder + w * k + k


def test_parameter_count_equals_a_hand_count():
    resnet18 = n_params(torchvision.models.resnet18(weights=None)) - (512 * 1000 + 1000)  # without fc
    resnet50 = n_params(torchvision.models.resnet50(weights=None)) - (2048 * 1000 + 1000)
    assert n_params(build_segmenter(ModelConfig(backbone="resnet18", output_stride=16), 15)) == hand_count(
        resnet18, 512, 64, 256, 15) == 12_332_895
    assert n_params(build_segmenter(ModelConfig(backbone="resnet50", decoder_channels=512), 19)) == hand_count(
        resnet50, 2048, 256, 512, 19)


@pytest.mark.parametrize("os_", [8, 16])
def test_its_programs_call_only_the_operators_the_pt2_loader_allows(os_):
    """Depthwise convolutions are `aten.conv2d`; `PROGRAM_OPS` lists every operator (the .pt2 scan)."""
    m = DeepLabV3Plus(5, "resnet18", os_).eval()
    example, dims = program_example(FAMILIES["deeplabv3plus"])
    program = torch.export.export(m, (example,), dynamic_shapes=dims)
    called = {f"torch.ops.{n.target}" if isinstance(n.target, torch._ops.OpOverload) else
              f"{n.target.__module__}.{n.target.__name__}" for n in program.graph.nodes if n.op == "call_function"}
    assert "torch.ops.aten.conv2d.default" in called and called <= PROGRAM_OPS


# ------------------------------------------------------------------------------------------
# The auxiliary head: training only
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    target = torch.randint(len(F2C), (2, 8, 8), generator=gen).repeat_interleave(8, 1).repeat_interleave(8, 2)
    target[:, :8] = IGNORE
    return x, target


def criterion(aux_weight: float, **loss) -> HiPoSegCriterion:
    return HiPoSegCriterion(LossConfig(terms=["ce"], **loss), F2C, 16, IGNORE, 100, aux_weight=aux_weight)


def test_the_auxiliary_loss_is_weighted_cross_entropy_on_stage_3_outside_eq_14(batch):
    x, target = batch
    torch.manual_seed(0)
    net = HiPoSegNet(DeepLabV3Plus(len(F2C), "resnet18", 16), with_projection=False, aux_head=True).train()
    assert net.aux_head.fcn[0].in_channels == 256  # ResNet-18 stage 3
    out = net(x)
    assert out.aux_logits.shape == out.logits.shape and out.embeddings is None
    loss, terms = criterion(0.4)(out.logits, None, target, 0, aux_logits=out.aux_logits)
    want_aux = F.cross_entropy(out.aux_logits, target, ignore_index=IGNORE)
    want_ce = F.cross_entropy(out.logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(terms["aux"], want_aux.detach())
    torch.testing.assert_close(loss, want_ce + 0.4 * want_aux)
    no_aux = HiPoSegNet(net.segmenter, with_projection=False)
    assert no_aux.aux_head is None and no_aux(x).aux_logits is None


def test_the_auxiliary_head_trains_the_head_and_stages_1_to_3(batch):
    x, target = batch
    torch.manual_seed(0)
    net = HiPoSegNet(DeepLabV3Plus(len(F2C), "resnet18", 16), with_projection=False, aux_head=True).train()
    out = net(x)
    loss, _ = criterion(1.0, lambda_ce=0.0)(out.logits, None, target, 0, aux_logits=out.aux_logits)  # aux alone
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(grads[n].abs().sum() > 0 for n, _ in net.aux_head.named_parameters(prefix="aux_head"))
    assert grads["segmenter.backbone.layer3.0.conv1.weight"].abs().sum() > 0
    assert not grads["segmenter.backbone.layer4.0.conv1.weight"].abs().sum()  # it reads stage 3, not stage 4
    before = {n: p.detach().clone() for n, p in net.aux_head.named_parameters()}
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert all(not torch.equal(p, before[n]) for n, p in net.aux_head.named_parameters())


def test_a_run_with_the_auxiliary_head_logs_it_and_keeps_it_out_of_the_exported_model(tiny_run, exported_models):
    """The tiny run trains with `model.aux_head`: its checkpoint holds the head, the export does not."""
    _, run = tiny_run
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("aux" in row for row in logged)
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["config"]["model"]["aux_head"] and ckpt["aux_head"]
    bare = build_segmenter(ModelConfig(backbone="resnet18", output_stride=16), 15)
    assert n_params(load_inference_model(exported_models["hiposeg"]).module) == n_params(bare)
    assert n_params(torch.export.load(exported_models["torch-export"]).module()) == n_params(bare)
    model = torch.load(exported_models["hiposeg"], weights_only=True)
    assert not any(k.startswith(("aux", "fcn")) for k in model["state_dict"])


# ------------------------------------------------------------------------------------------
# Files of the earlier, plain DeepLabV3+
# ------------------------------------------------------------------------------------------


def plain_model_weights() -> dict[str, torch.Tensor]:
    """A state dict with the names and shapes of the plain DeepLabV3+ (ResNet-18, 15 classes) that
    earlier hiposeg versions wrote."""
    state = {}
    for entry in EARLIER_KEYS["deeplabv3plus-resnet18"]:
        name, _, shape = entry.partition(" ")
        dims = [int(d) for d in shape.split("x")] if shape else []
        state[name] = torch.zeros(dims, dtype=torch.long) if name.endswith("num_batches_tracked") else torch.randn(dims)
    return state


def commands(path: Path, data: Path, tmp: Path) -> dict[str, list]:
    image = sorted((data / "val" / "images").iterdir())[0]
    return {"eval": ["eval", path, "--data", data, "--device", "cpu", "--workers", "0"],
            "export": ["export", path, "--out", tmp / "exported.pt"],
            "predict": ["predict", path, image, "--out", tmp / "pred", "--device", "cpu", "--workers", "0", "-q"],
            "train --resume": ["train", "--resume", path, "--data", data, "--out", tmp / "resumed", "--quiet",
                               "--device", "cpu"]}


def test_a_checkpoint_of_the_plain_model_is_refused_by_name_by_every_command(tiny_run, tmp_path):
    data, run = tiny_run
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    path = tmp_path / "plain.pt"
    torch.save({**ckpt, "model": plain_model_weights()}, path)
    for args in commands(path, data, tmp_path).values():
        fails_with(args, f"{path} {PLAIN_MODEL_ERROR}", "separable", "torch-export (.pt2) or ONNX export")
    assert not (tmp_path / "exported.pt").exists()
    # the resumed run's folder holds its lock (taken before the checkpoint is read) and nothing else
    assert [p.name for p in (tmp_path / "resumed").iterdir()] == [".hiposeg.lock"]


def test_an_exported_model_of_the_plain_model_is_refused_by_name(tiny_run, exported_models, tmp_path):
    """A file of the earlier version (no head or width in its arch record), and one whose record was
    edited to claim the separable head: refused by what the record says, and by what the weights are."""
    data, _ = tiny_run
    model = torch.load(exported_models["hiposeg"], weights_only=True)
    arch = {k: v for k, v in model["arch"].items() if k not in ("head", "decoder_channels")}
    earlier = tmp_path / "earlier.pt"
    torch.save({**model, "arch": arch, "state_dict": plain_model_weights()}, earlier)
    relabelled = tmp_path / "relabelled.pt"
    torch.save({**model, "state_dict": plain_model_weights()}, relabelled)
    for path in (earlier, relabelled):
        for name, args in commands(path, data, tmp_path).items():
            if name != "train --resume":  # a model file is not a checkpoint: refused before its weights are read
                fails_with(args, f"{path} {PLAIN_MODEL_ERROR}")
    unknown = tmp_path / "unknown.pt"
    torch.save({**model, "arch": {**model["arch"], "head": "dense-v9"}}, unknown)
    fails_with(commands(unknown, data, tmp_path)["eval"], f"{unknown} holds a DeepLabV3+ with the head 'dense-v9'")


def test_a_program_exported_from_the_plain_model_still_runs(exported_models, tmp_path):
    """A .pt2 program carries its own graph: one with an earlier arch record (no head) loads and runs."""
    meta = {k: v for k, v in torch.load(exported_models["hiposeg"], weights_only=True).items() if k != "state_dict"}
    meta["arch"] = {k: v for k, v in meta["arch"].items() if k not in ("head", "decoder_channels")}
    meta["output"] = {**meta["output"], "num_classes": 2}
    program = crafted.conv_program(tmp_path / "earlier.pt2", meta)
    loaded = load_inference_model(program)
    with torch.no_grad():
        assert loaded.module(torch.randn(1, 3, 40, 48)).shape == (1, 2, 40, 48)
