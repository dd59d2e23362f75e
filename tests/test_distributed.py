"""Distributed training: DDP under torchrun (gloo, 2 processes) against one process on the same global
batch, and the warning that batch-axis noise mixes only the local batch."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.distributed as dist

import noisynn_kernels as nk
from noisynn_kernels import train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TINY = json.dumps({"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3})
COMMON = ["--model", "noisy_vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "5", "--model-kwargs", TINY,
          "--steps", "3", "--batch-size", "8", "--seed", "0", "--device", "cpu", "--log-every", "1"]


def _torchrun(tmp_path, name, extra):
    out = tmp_path / f"{name}-ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "noisynn_kernels.train", *COMMON, *extra, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 process(es), global batch 8 (4 per process)" in proc.stdout, proc.stdout
    return torch.load(out), proc


def _single(tmp_path, name, extra):
    out = tmp_path / f"{name}-single.pt"
    assert train.main([*COMMON, *extra, "--out", str(out), "--quiet"]) == 0
    return torch.load(out)


def _assert_same_training(a, b):
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert len(a["losses"]) == len(b["losses"]) == 3
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=1e-6)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for n in b["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], rtol=1e-4, atol=1e-6, msg=f"grad of {n}")
    for n in b["params"]:
        torch.testing.assert_close(a["params"][n], b["params"][n], rtol=1e-4, atol=1e-6, msg=f"param {n}")


@pytest.mark.parametrize("noise,extra", [
    ("kind=optimal,axis=tokens", []),
    ("kind=shift,axis=rows,alpha=0.3,position=attn_input", ["--fused"]),
], ids=["optimal-tokens", "shift-rows-attn_input-fused"])
def test_ddp_matches_one_process_for_sample_local_noise(tmp_path, noise, extra):
    extra = ["--noise", noise, *extra]
    ddp, proc = _torchrun(tmp_path, "local", extra)
    single = _single(tmp_path, "local", extra)
    _assert_same_training(ddp, single)
    assert "mixes only the samples of this process's local batch" not in proc.stderr


def test_ddp_batch_axis_noise_mixes_the_local_batch_and_warns(tmp_path):
    extra = ["--noise", "kind=optimal,axis=batch,eval=false"]
    ddp, proc = _torchrun(tmp_path, "batch", extra)
    # one warning per process (rank 0 and rank 1), not one per step
    assert proc.stderr.count("mixes only the samples of this process's local batch") == 2, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    single = _single(tmp_path, "batch", extra)
    # the first step starts from the same weights on the same samples: the losses differ only because
    # each process mixed its 4 samples instead of all 8
    assert abs(ddp["losses"][0] - single["losses"][0]) > 1e-4
    diff = max((ddp["grads"][n] - single["grads"][n]).abs().max().item() for n in single["grads"])
    assert diff > 1e-4


def test_train_rejects_batch_not_divisible_by_world(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert train.main([*COMMON, "--batch-size", "8", "--quiet"]) == 2
    assert "not divisible by the 3 processes" in capsys.readouterr().err


def test_train_rejects_bad_noise_and_model(capsys):
    assert train.main(["--noise", "axis=batch", "--steps", "1"]) == 2
    assert "allow_batch_dependence" in capsys.readouterr().err
    assert train.main(["--model", "resnet18"]) == 2
    assert "unknown model 'resnet18'" in capsys.readouterr().err
    assert train.main(["--noise", "{not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_parse_noise_forms():
    assert train.parse_noise("default") is None
    assert train.parse_noise("none") is False
    assert train.parse_noise("shift:rows") == nk.NoiseConfig(kind="shift", axis="rows")
    assert train.parse_noise("kind=shift,alpha=0.2,eval=false,layer=0") == nk.NoiseConfig(
        kind="shift", alpha=0.2, eval=False, layer=0)
    assert train.parse_noise('{"kind": "gaussian", "seed": 3}') == nk.NoiseConfig(kind="gaussian", seed=3)
    with pytest.raises(nk.ConfigError):
        train.parse_noise("kind=shift,alpha=2")


# --------------------------------------------------------------------------------------------------
# the warning, in process (a world of 2 simulated)


def _fake_world(monkeypatch, size):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: size)


def _tiny(noise):
    torch.manual_seed(0)
    return timm.create_model("noisy_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, num_classes=5, noise=noise).train()


def _local_batch_warnings(record):
    return [w for w in record if "local batch" in str(w.message)]


@pytest.mark.parametrize("fused", (False, True))
def test_batch_axis_warns_once_in_a_world_of_two(monkeypatch, fused):
    _fake_world(monkeypatch, 2)
    model = _tiny(dict(kind="shift", axis="batch", eval=False))
    if fused:
        nk.swap_fused_ops(model, backend="reference")
    x = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(x)
        model(x)
    got = _local_batch_warnings(record)
    assert len(got) == 1, [str(w.message) for w in record]
    assert "world size 2" in str(got[0].message) and "axis='tokens' or 'rows'" in str(got[0].message)


@pytest.mark.parametrize("case", ["tokens axis", "world of one", "not initialized", "batch noise off in eval"])
def test_no_warning_when_the_mix_is_sample_local_or_single_process(monkeypatch, case):
    noise = dict(kind="optimal", axis="batch", eval=False)
    if case == "tokens axis":
        noise = dict(kind="optimal", axis="tokens")
    if case == "not initialized":
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    else:
        _fake_world(monkeypatch, 1 if case == "world of one" else 2)
    model = _tiny(noise)
    if case == "batch noise off in eval":
        model.eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    assert not _local_batch_warnings(record)


def test_warning_is_once_per_module(monkeypatch):
    _fake_world(monkeypatch, 4)
    a, b = (nk.NoiseInjection(dict(kind="optimal", axis="batch", eval=False)).train() for _ in range(2))
    x = torch.randn(3, 5, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for m in (a, b, a, b, a):
            m(x)
    got = _local_batch_warnings(record)
    assert len(got) == 2 and all("world size 4" in str(w.message) for w in got)


# --------------------------------------------------------------------------------------------------
# a swapped model under FSDP2 and DDP (tests/_dist_worker.py)


def _run_worker(tmp_path, device):
    out = tmp_path / f"dist-{device}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    worker = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, str(out),
           device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_matches_one_process(results):
    assert len(results) == 6, sorted(results)
    for setup, r in results.items():
        assert r["swapped"], setup
        # 2 fused calls per block and step (forward), 2 more per block with checkpointing (recomputation)
        per_step = 2 * 2 * (2 if setup.endswith("checkpointing") else 1)
        assert r["fused_calls"] == 3 * per_step, (setup, r["fused_calls"])
        # the same fp32 ops on half the batch each; DDP / FSDP average the two halves' gradients
        assert r["loss"] <= 1e-5, (setup, r)
        assert r["grad"] <= 1e-5 * max(1.0, r["grad_scale"]), (setup, r)
        assert r["param"] <= 1e-5, (setup, r)
        assert len(r["losses"]) == 3 and abs(r["losses"][0] - r["losses"][-1]) > 1e-4, (setup, r)  # it trained


def test_swapped_model_under_fsdp2_and_ddp(tmp_path):
    """FSDP2 (``fully_shard`` per block, then the model; also with gradient checkpointing) and DDP of a
    swapped noisy ViT under torchrun (2 gloo processes): each process trains on its half of the batch and
    the losses, last-step gradients and final parameters match one process on the whole batch.  (Before
    the fused step was the block's own call, FSDP's unshard hooks never ran: "mixed torch.Tensor and
    DTensor".)"""
    _assert_matches_one_process(_run_worker(tmp_path, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="NCCL with one GPU per process needs 2 GPUs")
def test_swapped_model_under_fsdp2_and_ddp_nccl(tmp_path):
    """The same with NCCL, one GPU per process, and the device's default fused backend (Triton)."""
    _assert_matches_one_process(_run_worker(tmp_path, "cuda"))
