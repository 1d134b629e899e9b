"""The CUDA paths, run where a GPU is (`python -m pytest -m cuda`, or the device suite `python -m
benchmarks.gpu`, which records each test's outcome); skipped, with the reason, everywhere else.

Mixed precision (bf16; fp16 with the GradScaler, whose inf/NaN step is skipped), channels-last,
SyncBatchNorm in a one-process NCCL group, the prototype branch in fp32 under autocast, an
interrupted and resumed run bit-exact under --deterministic, export -> predict on the GPU, and
(with >= 2 GPUs) `--gpus 2` over NCCL giving the prototypes of one process."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch

from conftest import tiny_config
from hiposeg import engine
from hiposeg.distributed import DistEnv

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none here); the GPU suite runs these: "
                                          "python -m benchmarks.gpu")]
FINE = 15  # the synthetic hierarchy's fine classes


def cuda_run(data, out, **run) -> engine.Training:
    """The engine's own setup of the tiny run on GPU 0 (fresh weights from the run's seed)."""
    cfg = tiny_config(data, out, run={"device": "cuda", **run}).with_absolute_paths()
    return engine.setup(cfg, DistEnv(device=torch.device("cuda", 0)), "cuda-test")


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 3, 64, 64, generator=gen), "fine": torch.randint(FINE, (2, 64, 64), generator=gen)}


def weights(run: engine.Training) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.net.parameters()]


def step_loss(run: engine.Training, b: dict[str, torch.Tensor]) -> float:
    engine.step(run, b)
    return run.meter.means(run.env)["loss"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_train_the_real_model(tiny_data, tmp_path, amp):
    run = cuda_run(tiny_data, tmp_path / amp, amp=amp)
    assert run.scaler.is_enabled() == (amp == "fp16")
    before = weights(run)
    losses = [step_loss(run, batch(i)) for i in range(3)]
    assert all(np.isfinite(losses)) and run.iteration == 3
    after = weights(run)
    assert all(torch.isfinite(w).all() for w in after)
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(before) // 2  # the step reached the weights


def test_fp16_step_with_an_inf_gradient_is_skipped_and_the_scale_lowered(tiny_data, tmp_path):
    run = cuda_run(tiny_data, tmp_path / "fp16", amp="fp16")
    step_loss(run, batch(0))  # a normal step first: the optimiser has momentum to (not) apply
    before, scale = weights(run), run.scaler.get_scale()
    first = next(run.net.parameters())
    hook = first.register_hook(lambda g: torch.full_like(g, float("inf")))
    step_loss(run, batch(1))
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, weights(run))), "the inf step changed the weights"
    assert run.scaler.get_scale() == scale / 2
    for i in range(2, 8):  # and training goes on (a step that overflows at the current scale is skipped too)
        step_loss(run, batch(i))
        if not all(torch.equal(a, b) for a, b in zip(before, weights(run))):
            break
    else:
        pytest.fail("no fp16 step after the inf one changed the weights")


def test_channels_last_step_equals_the_contiguous_one(tiny_data, tmp_path):
    plain, cl = cuda_run(tiny_data, tmp_path / "plain"), cuda_run(tiny_data, tmp_path / "cl", channels_last=True)
    conv = next(m for m in cl.net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for i in range(2):
        assert step_loss(cl, batch(i)) == pytest.approx(step_loss(plain, batch(i)), rel=5e-3)


def test_syncbn_in_a_one_process_nccl_group_matches_batchnorm(tiny_data, tmp_path):
    import torch.distributed as dist

    from hiposeg.engine import build_model
    from hiposeg.hierarchy import Hierarchy

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        cfg = tiny_config(tiny_data, tmp_path / "run")
        net, _ = build_model(cfg, Hierarchy.load("synthetic"))
        plain = net.cuda().train()
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).cuda().train()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[0])
        x = batch()["image"].cuda()
        out_sync, out_plain = ddp(x)[0], plain(x)[0]
        torch.testing.assert_close(out_sync, out_plain, rtol=1e-3, atol=1e-3)
        out_sync.square().mean().backward()
        bn_sync = [m.running_mean for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        bn_plain = [m.running_mean for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for a, b in zip(bn_sync, bn_plain):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    finally:
        dist.destroy_process_group()


def test_prototype_branch_stays_fp32_under_autocast(tiny_data, tmp_path):
    run = cuda_run(tiny_data, tmp_path / "bf16", amp="bf16", channels_last=True)
    b = batch()
    with run.precision:
        logits, emb = run.model(b["image"].cuda().contiguous(memory_format=torch.channels_last), with_embeddings=True)
    assert logits.dtype == torch.bfloat16  # autocast is on for the network ...
    assert emb.dtype == torch.float32  # ... and off for the embeddings
    loss, terms = run.criterion(logits, emb, b["fine"].cuda(), run.cfg.optim.iters - 1)  # past every phase
    assert loss.dtype == torch.float32 and {t.dtype for t in terms.values()} == {torch.float32}
    assert {buf.dtype for buf in run.criterion.buffers() if buf.is_floating_point()} == {torch.float32}


def test_interrupted_run_resumes_bit_exact_on_cuda(tiny_data, tmp_path, monkeypatch):
    from faults import StopAfter

    cfg = lambda out: tiny_config(tiny_data, out, run={"device": "cuda"})  # noqa: E731  (--deterministic)
    engine.fit(cfg(tmp_path / "full"))
    monkeypatch.setattr(engine, "StopSignal", lambda: StopAfter(3))
    assert engine.fit(cfg(tmp_path / "part")).interrupted
    monkeypatch.undo()
    engine.fit(cfg(tmp_path / "part"), resume=tmp_path / "part" / "checkpoints" / "last.pt")
    full, part = (torch.load(tmp_path / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
                  for name in ("full", "part"))
    differ = [f"{section}.{k}" for section in ("model", "projection", "memory")
              for k in full[section] if not torch.equal(full[section][k], part[section][k])]
    assert differ == [], f"differ after resume: {differ[:5]}"


@pytest.mark.parametrize("fmt", ["hiposeg", "torch-export"])
def test_exported_model_predicts_on_cuda_as_on_the_cpu(exported_models, tiny_run, tmp_path, fmt):
    from hiposeg.export import load_inference_model
    from hiposeg.predict import predict

    data, _ = tiny_run
    images = sorted((data / "val" / "images").iterdir())
    for device in ("cpu", "cuda"):
        model = load_inference_model(exported_models[fmt], device=torch.device(device))
        predict(model, images, tmp_path / device, overlay="none", progress=False, workers=0,
                device=torch.device(device))
    for image in images:
        cpu, gpu = (cv2.imread(str(tmp_path / d / "fine" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
                    for d in ("cpu", "cuda"))
        assert np.mean(cpu == gpu) > 0.999, image.name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_over_nccl_give_the_prototypes_of_one_process(tiny_data, tmp_path):
    runs = {n: engine.fit(tiny_config(tiny_data, tmp_path / f"gpus{n}", loss={"schedule": "joint"},
                                      optim={"iters": 2, "batch_size": 4}, run={"device": "cuda", "gpus": n}))
            for n in (1, 2)}
    one, two = (torch.load(runs[n].out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["memory"]
                for n in (1, 2))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k].float(), one[k].float(), rtol=1e-3, atol=1e-3, msg=k)
