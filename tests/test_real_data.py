"""Real data end to end: `noisynn train`, `noisynn audit` and `noisynn profile` on an image folder of real
images (scikit-learn's digits exported as PNG files, tests/_image_folder.py), under torchrun too, and a
clear error for every kind of bad folder.

What is checked: the training checkpoint loads with ``strict=True`` into the plain timm model of the same
architecture and, with its noise put back, reproduces the validation accuracy the run logged; resuming
continues the run; two DDP processes train as one process on the same global batches; the folder audit
finds the sample-local conditions batch-independent and the batch-reading ones batch-dependent; the
profile's shares add up to 100% and show the noisynn ops only where they run.
"""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import noisynn_kernels as nk
from noisynn_kernels import analysis
from noisynn_kernels.cli import main as cli_main

pytest.importorskip("sklearn")
from _image_folder import export_digits  # noqa: E402  (needs scikit-learn)

TINY = json.dumps({"depth": 2, "patch_size": 4, "embed_dim": 48, "num_heads": 3})
MODEL = ["--model", "noisy_vit_tiny_patch16_224", "--img-size", "16", "--model-kwargs", TINY]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return (export_digits(root / "train", 30), export_digits(root / "val", 8, offset=30))


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """Six epochs of a tiny fused NoisyViT (optimal noise over the tokens) on 300 digits, validated on 80 (timm's
    evaluation transform in training too: a ViT from scratch learns too slowly under random crops for CI)."""
    train, val = folders
    out = str(tmp_path_factory.mktemp("run"))
    rc = cli_main(["train", "--data", train, "--val-data", val, *MODEL, "--noise", "optimal:tokens", "--fused",
                   "--epochs", "6", "--batch-size", "16", "--lr", "3e-3", "--no-aug", "--out", out, "--quiet"])
    assert rc == 0
    return out


def _val_accuracy(model, val, img_size=16):
    ds = analysis.ImageFolderDataset(analysis.scan_image_folder(val),
                                     analysis.model_transform(model, img_size, training=False))
    return analysis.evaluate_accuracy(model, torch.utils.data.DataLoader(ds), batch_size=16, ordering="given")


def test_train_checkpoint_loads_strictly_into_plain_timm_and_reproduces_the_logged_accuracy(trained, folders):
    log = json.load(open(os.path.join(trained, "log.json")))
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert log["data"]["images"] == 300 and log["data"]["skipped"] == 0 and len(log["data"]["classes"]) == 10
    for e in log["epochs"]:
        assert e["images"] == 300 and e["val_images"] == 80 and e["images_per_second"] > 0
        assert 0.0 <= e["val_accuracy"] <= 1.0 and e["train_loss"] > 0
    assert log["epochs"][-1]["train_loss"] < 0.9 * log["epochs"][0]["train_loss"], "the model learns"
    ckpt = torch.load(os.path.join(trained, "checkpoint.pt"), weights_only=True)
    assert ckpt["arch"] == "vit_tiny_patch16_224" and ckpt["epoch"] == 6
    plain = timm.create_model(ckpt["arch"], **ckpt["create_kwargs"])
    assert type(plain).__name__ == "VisionTransformer" and nk.noise_config(plain) is None
    missing, unexpected = plain.load_state_dict(ckpt["model"], strict=True)
    assert not missing and not unexpected
    # The plain weights are the trained model: with its noise and fused ops back, the logged accuracy.
    nk.apply_noisynn(plain, ckpt["noise"])
    nk.swap_fused_ops(plain)
    acc = _val_accuracy(plain.eval(), folders[1])
    assert acc == pytest.approx(log["epochs"][-1]["val_accuracy"], abs=1e-12)
    assert acc > 0.2, "well above chance (0.1)"


def test_resume_continues_the_run(trained, folders, tmp_path):
    train, val = folders
    out = str(tmp_path / "resumed")
    rc = cli_main(["train", "--data", train, "--val-data", val, *MODEL, "--noise", "optimal:tokens", "--fused",
                   "--epochs", "7", "--batch-size", "16", "--lr", "3e-3", "--no-aug", "--out", out, "--quiet",
                   "--resume", os.path.join(trained, "checkpoint.pt")])
    assert rc == 0
    first = json.load(open(os.path.join(trained, "log.json")))["epochs"]
    log = json.load(open(os.path.join(out, "log.json")))["epochs"]
    assert [e["epoch"] for e in log] == list(range(1, 8))
    assert log[:6] == first
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 7


def test_audit_on_the_folder_tells_sample_local_from_batch_reading_noise(trained, folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "audit"
    rc = cli_main(["audit", "--data", folders[1], "--checkpoint", os.path.join(trained, "checkpoint.pt"),
                   "--noise", "kind=salt_and_pepper,p=0.1",
                   "--noise", "kind=salt_and_pepper,p=0.1,value_range=batch,allow_batch_dependence=true",
                   "--batch-sizes", "2", "20", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "report.md" in capsys.readouterr().out
    result = json.loads((out / "audit.json").read_text())
    sm = result["summary"]
    assert list(sm) == ["none", "trained noise", "kind=salt_and_pepper,p=0.1",
                        "kind=salt_and_pepper,p=0.1,value_range=batch,allow_batch_dependence=true", "official"]
    assert sm["none"]["batch_dependent"] is False and sm["trained noise"]["batch_dependent"] is False
    acc = sm["none"]["accuracy"]
    assert acc["sorted"]["mean"] == acc["shuffled"]["mean"] == acc["single"]["mean"]
    # random noise: batch-independent with each sample's own range, dependent with the batch's (same draws)
    own, batch = sm["kind=salt_and_pepper,p=0.1"], sm[list(sm)[3]]
    assert own["stochastic"] and batch["stochastic"]
    assert own["batch_dependent"] is False and own["paired_max_logit_diff"] <= own["tolerance"]
    assert batch["batch_dependent"] is True and batch["paired_max_logit_diff"] > 10 * batch["tolerance"]
    assert sm["official"]["batch_dependent"] is True
    assert result["data"]["images"] == 80 and set(result["batch_size_sweep"]["sorted"]) == {"2", "20"}
    for name in ("report.md", "accuracy_by_ordering.png", "official_batch_size.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| `official` |" in report and "**yes**" in report and "no (same draws)" in report


def test_profile_compare_shares_add_up_and_show_the_fused_ops(tmp_path, capsys):
    out = tmp_path / "prof"
    rc = cli_main(["profile", *MODEL, "--compare", "--fused", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                   "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "noisynn ops" in table and "plain timm" in table and "eager noisy" in table and "fused" in table
    payload = json.loads((out / "profile.json").read_text())
    res = {r["label"]: r for r in payload["results"]}
    assert list(res) == ["plain timm", "eager noisy", "fused"]
    for r in res.values():
        assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-9)
        assert r["step_seconds"] > 0 and r["images_per_second"] > 0 and r["shares"]["matmul"] > 0
        trace = json.load(open(r["trace"]))
        assert trace["traceEvents"]
    assert os.path.basename(res["fused"]["trace"]) == "trace.json"
    assert res["plain timm"]["shares"]["noisynn"] == 0.0 and res["plain timm"]["calls_per_step"]["noisynn"] == 0
    assert res["fused"]["shares"]["noisynn"] > 0, "the fused add + noise + LayerNorm ops"
    # (shares of a tiny model's step move by several points between runs on a busy machine; the calls do not)
    calls = {k: r["calls_per_step"] for k, r in res.items()}
    assert calls["fused"]["noisynn"] >= 2 * 2, "forward and backward of two blocks' pairs of fused ops at least"
    # the fused model runs its LayerNorms and residual adds inside the noisynn ops
    assert calls["fused"]["layernorm_add"] < calls["eager noisy"]["layernorm_add"]
    assert calls["eager noisy"]["matmul"] == calls["plain timm"]["matmul"] == calls["fused"]["matmul"]


# --------------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------------
def test_ddp_folder_training_matches_one_process(folders, tmp_path):
    """Two processes share the folder check (two unreadable images, one found by each) and train on the same
    global batches as one process: same losses, same validation accuracy, same weights."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    train = export_digits(tmp_path / "train", 20)
    for name in ("zero/0000a.png", "zero/0000b.png"):  # consecutive: the two processes check one each
        _write(os.path.join(train, name), b"\x89PNG\r\n\x1a\n truncated")
    common = ["--data", train, "--val-data", folders[1], *MODEL, "--noise", "optimal:tokens", "--no-aug", "--opt",
              "sgd", "--lr", "0.02", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--bad-images", "skip"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "noisynn_kernels.train", *common, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stderr and "global batch 8 (4 per process)" in proc.stderr
    assert "200 images in 10 classes (2 unreadable skipped)" in proc.stderr
    assert proc.stdout.count("noisynn train: 1 epoch(s), 200 images") == 1, proc.stdout  # rank 0 only
    assert cli_main(["train", *common, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    ddp = json.load(open(tmp_path / "ddp" / "log.json"))
    one = json.load(open(tmp_path / "one" / "log.json"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert ddp["data"]["skipped_files"] == one["data"]["skipped_files"] and ddp["data"]["skipped"] == 2
    a, b = ddp["epochs"][0], one["epochs"][0]
    assert a["images"] == b["images"] == 200 and a["val_images"] == b["val_images"] == 80
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["val_accuracy"] == b["val_accuracy"]
    pa = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    pb = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    for k in pb:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------------------------------
# bad folders and names
# --------------------------------------------------------------------------------------------------
def _write(path, data=b""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _bad_folder(tmp_path, case):
    root = tmp_path / "data"
    if case == "missing":
        return str(root)
    if case == "a file":
        _write(str(root), b"not a folder")
        return str(root)
    if case == "one class":
        export_digits(root, 3, classes=[1])
    elif case == "no images":
        for c in ("a", "b"):
            _write(str(root / c / "notes.txt"), b"text")
    elif case == "a class without images":
        export_digits(root, 3, classes=[1, 2])
        _write(str(root / "three" / "readme.md"), b"text")
    return str(root)


@pytest.mark.parametrize("case,expected", [
    ("missing", ["does not exist", "one sub-folder of images per class"]),
    ("a file", ["is not a folder", "one sub-folder of images per class"]),
    ("one class", ["1 class folder(s) ['one']", "at least two sub-folders"]),
    ("no images", ["holds no images", "2 class folders", "2 other file(s)"]),
    ("a class without images", ["['three'] hold no images", "at least one image in every class folder"]),
])
@pytest.mark.parametrize("command", ["train", "audit"])
def test_bad_folders_exit_2_with_a_clear_message(tmp_path, capsys, case, expected, command):
    root = _bad_folder(tmp_path, case)
    args = ["train", "--data", root, *MODEL] if command == "train" else [
        "audit", "--data", root, "--model", "vit_tiny_patch16_224", "--quiet"]
    assert cli_main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"noisynn {command}: ")
    for text in expected:
        assert text in err, (text, err)


def _folder_with_a_broken_image(tmp_path):
    root = export_digits(tmp_path / "data", 4, classes=[3, 7])
    _write(os.path.join(root, "seven", "broken.png"), b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_unreadable_image_stops_the_run_by_default(tmp_path, capsys):
    root = _folder_with_a_broken_image(tmp_path)
    assert cli_main(["train", "--data", root, *MODEL, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "1 of 9 image(s) cannot be read" in err and "broken.png" in err and "--bad-images skip" in err
    assert not (tmp_path / "out").exists(), "nothing written"
    assert cli_main(["audit", "--data", root, "--model", "vit_tiny_patch16_224", "--out", str(tmp_path / "a"),
                     "--quiet"]) == 2
    assert "1 of 9 image(s) cannot be read" in capsys.readouterr().err


def test_unreadable_image_skipped_and_counted(tmp_path, capsys):
    root = _folder_with_a_broken_image(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["train", "--data", root, *MODEL, "--bad-images", "skip", "--batch-size", "4",
                     "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "8 images in 2 classes (1 unreadable skipped)" in cap.err
    assert "1 epoch(s), 8 images, 2 classes" in cap.out
    log = json.load(open(out / "log.json"))
    assert log["data"]["images"] == 8 and log["data"]["skipped"] == 1
    assert log["data"]["skipped_files"][0]["path"].endswith("broken.png")
    assert log["epochs"][0]["images"] == 8
    # the audit counts it the same way
    assert cli_main(["audit", "--data", root, "--model", "noisy_vit_tiny_patch16_224", "--img-size", "16",
                     "--model-kwargs", TINY, "--bad-images", "skip", "--batch-sizes", "--out", str(tmp_path / "a"),
                     "--quiet"]) == 0
    result = json.load(open(tmp_path / "a" / "audit.json"))
    assert result["data"]["images"] == 8 and result["data"]["skipped"] == 1


def test_unknown_timm_model_exits_2(tmp_path, capsys):
    root = export_digits(tmp_path / "data", 2, classes=[0, 1])
    assert cli_main(["train", "--data", root, "--model", "vit_tinyy_patch16_224", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "timm does not know the model 'vit_tinyy_patch16_224'" in err and "vit_" in err
    assert cli_main(["audit", "--data", root, "--model", "no_such_net", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "timm does not know the model 'no_such_net'" in capsys.readouterr().err
    assert cli_main(["profile", "--model", "no_such_net", "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "timm does not know the model 'no_such_net'" in capsys.readouterr().err


def test_plain_timm_model_trains_and_checkpoint_matches_its_name(tmp_path):
    """Any timm model (here a ResNet: no img_size argument) trains on a folder, plain or with --noise."""
    root = export_digits(tmp_path / "data", 4, classes=[0, 1])
    out = tmp_path / "out"
    assert cli_main(["train", "--data", root, "--model", "resnet18", "--img-size", "32", "--noise", "shift:rows",
                     "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["arch"] == "resnet18" and "img_size" not in ckpt["create_kwargs"]
    assert ckpt["noise"]["kind"] == "shift" and ckpt["noise"]["axis"] == "rows"
    timm.create_model("resnet18", **ckpt["create_kwargs"]).load_state_dict(ckpt["model"], strict=True)
    # the audit reads the images at the training resolution, not the architecture's default 224
    assert cli_main(["audit", "--data", root, "--checkpoint", str(out / "checkpoint.pt"), "--batch-size", "2",
                     "--batch-sizes", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    result = json.load(open(tmp_path / "a" / "audit.json"))
    assert result["model"]["img_size"] == 32 and result["model"]["arch"] == "resnet18"
    assert result["summary"]["official"]["batch_dependent"] is True, "shift across the batch (official_cnn)"


def test_amp_runs_in_train_and_profile(tmp_path, capsys):
    root = export_digits(tmp_path / "data", 4, classes=[0, 1])
    out = tmp_path / "out"
    assert cli_main(["train", "--data", root, *MODEL, "--amp", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    assert "amp bfloat16" not in capsys.readouterr().err  # --quiet
    log = json.load(open(out / "log.json"))
    assert log["args"]["amp"] == "auto" and log["epochs"][0]["images"] == 8
    assert cli_main(["profile", *MODEL, "--amp", "bfloat16", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                     "--device", "cpu", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    payload = json.load(open(tmp_path / "p" / "profile.json"))
    assert payload["amp"] == "bfloat16" and payload["results"][0]["label"] == "eager noisy"
    assert "amp bfloat16" in capsys.readouterr().out
