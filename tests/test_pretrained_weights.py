"""`--pretrained imagenet`: each family's ImageNet weights through the library that owns them and its
cache (torchvision -> torch hub's $TORCH_HOME/hub/checkpoints; timm and smp -> the Hugging Face hub
cache), checked before loading. No test touches the network (conftest sets HIPOSEG_OFFLINE and
HF_HUB_OFFLINE): a cache filled with a file the test writes, at the place and name the library
expects, loads through the real code path; an empty cache offline is a clear error; a damaged or
wrong file is refused with the model untouched. `--pretrained PATH` and `none` keep working."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import fails_with, squash
from hiposeg.config import ModelConfig
from hiposeg.errors import UserError
from hiposeg.models import build_segmenter, load_pretrained

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit refs/main names in a filled hub cache
MIT_B0 = ("smp-hub/mit_b0.imagenet", "9ce53d104d92d75aabb00aae70677aaab67e7c84")  # smp 0.6's pinned revision
MIT_B5 = ("smp-hub/mit_b5.imagenet", "ced04d96c586b6297fd59a7a1e244fc78fdb6531")


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty torch hub and Hugging Face caches in tmp_path. TORCH_HOME is read by torch.hub at every
    call; the hub client reads HF_HUB_CACHE at import, so its constant is pointed there too."""
    from huggingface_hub import constants

    torch_home, hf_cache = tmp_path / "torch", tmp_path / "hf" / "hub"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    return {"torch": torch_home / "hub" / "checkpoints", "hf": hf_cache}


def hub_snapshot(hf_cache: Path, repo: str, revision: str | None) -> Path:
    """The snapshot folder of `repo` in the hub's cache layout: models--ORG--NAME/snapshots/COMMIT,
    with refs/main naming the commit when the revision is the main branch."""
    folder = hf_cache / ("models--" + repo.replace("/", "--"))
    commit = revision or COMMIT
    if revision is None:
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(COMMIT)
    (folder / "snapshots" / commit).mkdir(parents=True)
    return folder / "snapshots" / commit


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return state


def fill_torchvision(caches) -> dict[str, torch.Tensor]:
    """torchvision's resnet18 ImageNet file name, holding a freshly built ResNet-18 (fc included)."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    caches["torch"].mkdir(parents=True)
    torch.save(state, caches["torch"] / "resnet18-f37072fd.pth")
    return state


def fill_timm(caches) -> dict[str, torch.Tensor]:
    """timm's default ImageNet weights of hrnet_w18_small (its gluon_in1k repository, main branch), holding a freshly built classification
    HRNet: its incre/downsample/final/classifier modules are what the segmenter leaves out."""
    import timm

    torch.manual_seed(4)
    state = timm.create_model("hrnet_w18_small").state_dict()
    return save_safetensors(state, hub_snapshot(caches["hf"], "timm/hrnet_w18_small.gluon_in1k", None) / "model.safetensors")


def fill_smp(caches) -> dict[str, torch.Tensor]:
    """smp's mit_b0 encoder repository at the revision smp pins, holding a freshly built encoder."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(5)
    state = smp.encoders.get_encoder("mit_b0", weights=None).state_dict()
    return save_safetensors(state, hub_snapshot(caches["hf"], *MIT_B0) / "model.safetensors")


# family, variant, cache filler, the segmenter's part that loads, the keys the part leaves out
SOURCES = {
    "torchvision": ("deeplabv3plus", "resnet18", fill_torchvision, "backbone", ["fc.bias", "fc.weight"]),
    "timm": ("hrnet", "hrnet_w18_small", fill_timm, "backbone", ["classifier.bias", "classifier.weight"]),
    "smp": ("segformer", "mit_b0", fill_smp, "model.encoder", []),
}


def part_of(segmenter, name: str) -> torch.nn.Module:
    return segmenter.get_submodule(name)


@pytest.mark.parametrize("source", list(SOURCES))
def test_imagenet_weights_load_from_a_filled_cache_through_the_librarys_path(caches, source):
    family, variant, fill, part, dropped = SOURCES[source]
    state = fill(caches)
    cfg = ModelConfig(name=family, backbone=variant, output_stride=16, pretrained="imagenet")
    segmenter = build_segmenter(cfg, 3, pretrained=False)
    report = load_pretrained(segmenter, cfg)
    loaded = part_of(segmenter, part).state_dict()
    for k, v in loaded.items():
        if k in state:
            assert torch.equal(v, state[k]), k
    assert all(k in state for k in loaded if not k.endswith("num_batches_tracked"))
    assert report.loaded == report.total == len(loaded) and report.part == part
    assert set(dropped) <= set(report.dropped) and not set(report.dropped) & set(loaded)
    assert str(caches["torch"] if source == "torchvision" else caches["hf"]) in str(report.file)
    line = report.line()
    assert f"loaded {len(loaded)}/{len(loaded)} tensors from {report.file} (imagenet: " in line
    assert ("left out" in line) == bool(report.dropped)


def test_timm_hrnet_leaves_out_the_classification_modules_only(caches):
    fill_timm(caches)
    cfg = ModelConfig(name="hrnet", backbone="hrnet_w18_small", pretrained="imagenet")
    report = load_pretrained(build_segmenter(cfg, 3, pretrained=False), cfg)
    assert {k.split(".")[0] for k in report.dropped} == {"incre_modules", "downsamp_modules", "final_layer",
                                                         "classifier"}


@pytest.mark.parametrize("source, file, where", [
    ("torchvision", "resnet18-f37072fd.pth", "{torch}/resnet18-f37072fd.pth"),
    ("timm", "model.safetensors", "{hf}/models--timm--hrnet_w18_small.gluon_in1k/snapshots/<the commit named in "
                                  "refs/main>/model.safetensors"),
    ("smp", "model.safetensors", f"{{hf}}/models--smp-hub--mit_b0.imagenet/snapshots/{MIT_B0[1]}/model.safetensors"),
])
def test_an_empty_cache_offline_names_the_file_where_it_goes_and_both_ways_out(caches, source, file, where):
    family, variant, *_ = SOURCES[source]
    with pytest.raises(UserError) as e:
        build_segmenter(ModelConfig(name=family, backbone=variant, pretrained="imagenet"), 3)
    text = squash(str(e.value))
    assert squash(f"{file} is missing (HIPOSEG_OFFLINE is set: nothing is downloaded)") in text
    assert squash(f"the cache expects it at {where.format(**caches)}") in text
    assert squash("run this command once on a machine with network access") in text
    assert squash("--pretrained PATH") in text


def test_a_failed_download_is_the_same_clear_error(caches, monkeypatch):
    """Online, but the download fails (no route, proxy, DNS): the URL and the cause are named."""
    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HIPOSEG_OFFLINE")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as e:
        build_segmenter(ModelConfig(backbone="resnet18", pretrained="imagenet"), 3)
    assert squash("downloading https://download.pytorch.org/models/resnet18-f37072fd.pth failed: <urlopen error "
                  "[Errno -2] Name or service not known>") in squash(e.value.message)
    assert not (caches["torch"] / "resnet18-f37072fd.pth").exists()


@pytest.mark.parametrize("damage", ["truncated", "other architecture"])
@pytest.mark.parametrize("source", ["torchvision", "smp"])
def test_a_damaged_or_wrong_cached_file_is_refused_and_nothing_is_loaded(caches, source, damage):
    family, variant, fill, part, _ = SOURCES[source]
    fill(caches)
    cached = next(p for p in (caches["torch"], caches["hf"]) if p.exists()).rglob("*")
    path = next(p for p in cached if p.is_file() and p.suffix in (".pth", ".safetensors"))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        other = {"torchvision": torchvision.models.resnet50(weights=None).state_dict(),
                 "smp": {"patch_embed1.proj.weight": torch.zeros(64, 3, 7, 7)}}[source]
        torch.save(other, path) if source == "torchvision" else save_safetensors(other, path)
    cfg = ModelConfig(name=family, backbone=variant, output_stride=16, pretrained="imagenet")
    segmenter = build_segmenter(cfg, 3, pretrained=False)
    before = {k: v.clone() for k, v in part_of(segmenter, part).state_dict().items()}
    with pytest.raises(UserError) as e:
        load_pretrained(segmenter, cfg)
    if damage == "truncated":
        assert f"cannot read pretrained weights file {path} (damaged, truncated" in e.value.message
        assert f"delete {path} so that it is downloaded again" in e.value.hint
    else:
        assert f"pretrained weights file {path} does not match the {part} of {variant}" in e.value.message
        assert ("unexpected keys" if source == "torchvision" else "missing keys") in e.value.message
    after = part_of(segmenter, part).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # never half-loaded


def test_a_local_file_of_another_family_loads_the_same_way(caches, tmp_path):
    """--pretrained PATH for HRNet: timm's checkpoint file, wherever it is, checked alike."""
    import timm

    torch.manual_seed(6)
    state = timm.create_model("hrnet_w18_small").state_dict()
    path = tmp_path / "hrnet_w18_small.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # a DDP training checkpoint
    m = build_segmenter(ModelConfig(name="hrnet", backbone="hrnet_w18_small", pretrained=str(path)), 3)
    assert torch.equal(m.backbone.state_dict()["conv1.weight"], state["conv1.weight"])
    with pytest.raises(UserError, match="pretrained weights file .*nope.pth does not exist") as e:
        build_segmenter(ModelConfig(name="hrnet", backbone="hrnet_w18_small", pretrained=str(tmp_path / "nope.pth")), 3)
    assert "never downloaded" in e.value.hint
    assert ModelConfig(pretrained="none").pretrained is None


def run_cli(args: list, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hiposeg", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=cwd, timeout=600)


def test_the_paper_command_offline_names_the_missing_file_and_the_fix(tiny_data, tmp_path):
    """`hiposeg train --dataset cityscapes --model segformer --backbone mit_b5 --pretrained imagenet`, in a
    fresh process whose caches (HF_HOME, HF_HUB_CACHE, TORCH_HOME) are empty and offline: one clear
    error before anything is written."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1", "HIPOSEG_OFFLINE": "1"}
    proc = run_cli(["train", "--dataset", "cityscapes", "--model", "segformer", "--backbone", "mit_b5", "--pretrained",
                    "imagenet", "--data", tiny_data, "--out", tmp_path / "run", "--quiet"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = squash(proc.stdout + proc.stderr)
    assert "Traceback" not in text
    for needle in ["the ImageNet weights of segmentation_models_pytorch mit_b5.imagenet are not on this machine: "
                   "model.safetensors is missing",
                   f"{tmp_path}/hf/hub/models--smp-hub--mit_b5.imagenet/snapshots/{MIT_B5[1]}/model.safetensors",
                   "a machine with network access", "--pretrained PATH"]:
        assert squash(needle) in text, needle
    assert not (tmp_path / "run").exists()


def test_a_run_in_a_fresh_process_reads_the_cache_its_environment_names(tiny_data, tmp_path):
    """HF_HUB_CACHE set for a new process (the hub client reads it at import): the run loads the file
    there and its output names the file, the source and the tensors loaded."""
    import segmentation_models_pytorch as smp

    hf = tmp_path / "hf" / "hub"
    torch.manual_seed(7)
    state = save_safetensors(smp.encoders.get_encoder("mit_b0", weights=None).state_dict(),
                             hub_snapshot(hf, *MIT_B0) / "model.safetensors")
    env = {"HF_HUB_CACHE": str(hf), "HF_HUB_OFFLINE": "1", "HIPOSEG_OFFLINE": "1"}
    proc = run_cli(["train", "--data", tiny_data, "--out", tmp_path / "run", "--model", "segformer", "--backbone",
                    "mit_b0", "--pretrained", "imagenet", "--iters", "1", "--batch-size", "2", "--crop", "64x64",
                    "--workers", "0", "--device", "cpu", "--set", "model.embed_dim=16"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert squash(f"pretrained model.encoder: loaded {len(state)}/{len(state)} tensors from {hf}/models--smp-hub--"
                  f"mit_b0.imagenet/snapshots/{MIT_B0[1]}/model.safetensors (imagenet: segmentation_models_pytorch "
                  f"mit_b0.imagenet (huggingface.co/smp-hub/mit_b0.imagenet@9ce53d104d92))") in squash(proc.stderr)


def test_a_resumed_run_takes_every_weight_from_its_checkpoint(caches, tiny_data, tmp_path, monkeypatch, capsys):
    """The pretrained file is read when a run starts, never when it resumes: with the cache deleted
    after the interruption, the run still resumes (and ends as an uninterrupted one)."""
    import shutil

    import hiposeg.engine as engine
    from conftest import tiny_config
    from faults import StopAfter

    fill_smp(caches)
    cfg = tiny_config(tiny_data, tmp_path / "run", model={"name": "segformer", "backbone": "mit_b0",
                                                          "pretrained": "imagenet", "embed_dim": 16},
                      optim={"iters": 4}, run={"quiet": False, "ckpt_every": 100})
    engine.fit(cfg.model_copy(update={"run": cfg.run.model_copy(update={"out": tmp_path / "full"})}))
    stop = engine.StopSignal
    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(2))
    assert engine.fit(cfg).interrupted
    assert "pretrained model.encoder: loaded" in capsys.readouterr().err
    monkeypatch.setattr(engine, "StopSignal", stop)
    shutil.rmtree(caches["hf"])
    done = engine.fit(cfg, resume=tmp_path / "run" / "checkpoints" / "last.pt")
    assert done.iterations == 4 and "pretrained" not in capsys.readouterr().err
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_offline_error_is_one_message_through_the_cli(caches, tiny_data, tmp_path):
    fails_with(["train", "--data", tiny_data, "--out", tmp_path / "run", "--model", "hrnet", "--backbone",
                "hrnet_w18_small", "--pretrained", "imagenet", "--quiet"],
               "the ImageNet weights of timm hrnet_w18_small.gluon_in1k are not on this machine", "--pretrained PATH")
