"""Batch-dependence audit, entropy diagnostics, layer sensitivity and `noisynn audit`.

Invariants checked: sample-local models (no noise, linear noise along tokens / rows) give the same
outputs for every sample whatever the rest of its batch; the batch-axis guard refuses inference-time
batch mixing without the explicit opt-in, and with it the official protocol's outputs do depend on the
batch; the entropy estimators agree with closed forms on synthetic Gaussians.  Runs on CPU with one
torch thread (restored afterwards) in well under a minute.
"""

import json
import math

import pytest
import timm
import torch

import noisynn_kernels as nk
from noisynn_kernels import analysis, audit, quality
from noisynn_kernels.analysis.profile import classify
from noisynn_kernels.cli import main as cli_main
from noisynn_kernels.models.patch import noise_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: one thread is as fast and does not collapse when other processes share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(noise=False, depth=2, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("noisy_vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=32,
                             depth=depth, num_heads=2, num_classes=4, noise=noise)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.arange(40) % 4  # 10 images per class: every class-sorted batch of 10 holds one class
    return x, y


# --------------------------------------------------------------------------------------------------
# batch dependence
# --------------------------------------------------------------------------------------------------
SAMPLE_LOCAL = {
    "none": False,
    "optimal-tokens": dict(kind="optimal", axis="tokens"),
    "optimal-rows": dict(kind="optimal", axis="rows"),
    "shift-tokens": dict(kind="shift", axis="tokens", alpha=0.3),
    "shift-rows": dict(kind="shift", axis="rows", alpha=0.3),
    "optimal-tokens-attn_input": dict(kind="optimal", axis="tokens", position="attn_input", layer=0),
}


@pytest.mark.parametrize("noise", list(SAMPLE_LOCAL.values()), ids=list(SAMPLE_LOCAL))
def test_sample_local_noise_has_zero_batch_dependence(noise, data):
    x, y = data
    model = tiny_vit(noise)
    model.train()
    r = analysis.batch_dependence(model, x, y, batch_size=10)
    assert model.training, "the audit must restore the model's mode"
    assert r.orderings == ("sorted", "shuffled", "single")
    assert r.tolerance == pytest.approx(analysis.default_tolerance(torch.float32, r.tolerance / 1e-4))
    assert r.max_logit_diff <= r.tolerance, r.pairs
    assert r.n_argmax_changed == 0
    assert r.floor["max_logit_diff"] == 0.0 and not r.stochastic
    assert r.batch_dependent is False
    assert len(set(r.accuracy.values())) == 1, r.accuracy


def test_sample_local_noise_float64_is_independent_to_1e_10(data):
    x, y = data
    model = tiny_vit(dict(kind="optimal", axis="rows")).double()
    r = analysis.batch_dependence(model, x.double(), y, batch_size=10,
                                  orderings=("sorted", "shuffled", "single", "given"))
    assert r.tolerance <= 1e-9
    assert r.max_logit_diff <= r.tolerance
    assert len(r.pairs) == 6


def test_guard_refuses_batch_mixing_at_eval_without_opt_in(data):
    x, y = data
    with pytest.raises(nk.BatchDependenceError):
        nk.NoiseConfig.official_vit()
    with pytest.raises(nk.BatchDependenceError):
        tiny_vit(dict(kind="optimal", axis="batch"))
    with pytest.raises(nk.BatchDependenceError):
        audit.conditions()  # the official condition is built only with the explicit opt-in
    assert not {"official", "salt_and_pepper/batch"} & set(audit.conditions(include_official=False))
    assert audit.conditions(allow_batch_dependence=True)["official"].allow_batch_dependence is True
    assert audit.conditions(allow_batch_dependence=True)["salt_and_pepper/batch"].batch_dependent
    # A validated config altered behind the validator's back is refused by the audit, not evaluated.
    model = tiny_vit(nk.NoiseConfig.official_vit(allow_batch_dependence=True))
    object.__setattr__(noise_config(model), "allow_batch_dependence", False)
    with pytest.raises(nk.BatchDependenceError, match="allow_batch_dependence"):
        analysis.batch_dependence(model, x, y)
    with pytest.raises(nk.BatchDependenceError):
        analysis.evaluate_accuracy(model, x, y)


def test_official_protocol_with_opt_in_depends_on_the_batch(data):
    x, y = data
    plain = tiny_vit(False)
    model = nk.apply_noisynn(tiny_vit(False), nk.NoiseConfig.official_vit(allow_batch_dependence=True))
    r = analysis.batch_dependence(model, x, y, batch_size=10, keep_outputs=True)
    ref = analysis.batch_dependence(plain, x, y, batch_size=10, keep_outputs=True)
    assert not r.stochastic
    assert r.batch_dependent is True
    assert r.max_logit_diff > 100 * r.tolerance
    assert r.pairs["sorted|shuffled"]["max_logit_diff"] > 100 * r.tolerance
    assert r.n_argmax_changed > 0, "some prediction should flip with the batch composition"
    # Batch size 1: the batch-axis mix of one sample is the identity, so the plain model's outputs.
    torch.testing.assert_close(r.outputs["single"], ref.outputs["single"], atol=1e-5, rtol=1e-5)
    # With batches the outputs are not the plain model's.
    assert (r.outputs["sorted"] - ref.outputs["sorted"]).abs().max() > 1e-3
    assert r.purity == {"sorted": 1.0, "shuffled": pytest.approx(r.purity["shuffled"]), "single": 1.0}
    assert r.purity["shuffled"] < 1.0
    assert r.to_dict()["batch_dependent"] is True and "outputs" not in r.to_dict()


def test_random_noise_is_reported_as_stochastic(data):
    x, y = data
    r = analysis.batch_dependence(tiny_vit(dict(kind="gaussian", strength=0.5)), x, y, batch_size=10)
    assert r.stochastic and r.floor["max_logit_diff"] > r.tolerance
    # the same draw per sample with other batch mates: Gaussian noise reads nothing of the batch
    assert r.paired is not None and r.paired["n_samples"] == 40 and r.paired["floor_max_logit_diff"] == 0.0
    assert r.paired["max_logit_diff"] <= r.tolerance and r.batch_dependent is False
    # too few full batches for a same-draw comparison: undecided
    few = analysis.batch_dependence(tiny_vit(dict(kind="gaussian", strength=0.5)), x, y, batch_size=30)
    assert few.stochastic and few.paired is None and few.batch_dependent is None


@pytest.mark.parametrize("value_range,dependent", [("sample", False), ("batch", True)])
def test_same_draws_tell_salt_and_pepper_ranges_apart(data, value_range, dependent):
    """Each sample's own range (the default) is batch-independent; the batch-wide range is not.  Neither is
    visible in the plain orderings, where every pass draws new noise."""
    x, y = data
    noise = dict(kind="salt_and_pepper", p=0.2, value_range=value_range, allow_batch_dependence=dependent)
    r = analysis.batch_dependence(tiny_vit(noise), x, y, batch_size=10)
    assert r.stochastic and r.paired is not None
    assert r.batch_dependent is dependent
    assert (r.paired["max_logit_diff"] > 10 * r.tolerance) is dependent
    assert r.to_dict()["paired"]["n_samples"] == 40


def test_rotated_batches_keep_every_slot_and_change_every_batch():
    batches = [torch.arange(i * 4, i * 4 + 4) for i in range(3)] + [torch.tensor([12, 13])]
    rotated, members = analysis.rotated_batches(batches)
    assert sorted(members.tolist()) == list(range(12)) and len(rotated) == 3
    for new in rotated:
        assert [int(v) % 4 for v in new] == [0, 1, 2, 3], "each sample keeps its slot"
        assert len({int(v) // 4 for v in new}) == 3 or len(new) > 3, "mates from other batches"
        assert not any(torch.equal(new, old) for old in batches)


class _Counting(torch.utils.data.Dataset):
    """(x[i], y[i]) pairs that count every read; no ``targets`` attribute (labels come from the items)."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, [0] * len(y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        assert isinstance(i, int)
        self.reads[i] += 1
        return self.x[i], int(self.y[i])


def test_entry_points_take_a_dataset_or_a_loader_and_stream_it(data):
    x, y = data
    model = tiny_vit(dict(kind="optimal", axis="tokens"))
    ref = analysis.batch_dependence(model, x, y, batch_size=10, keep_outputs=True)
    ds = _Counting(x, y)
    for source in (torch.utils.data.TensorDataset(x, y), ds, torch.utils.data.DataLoader(ds, batch_size=3)):
        r = analysis.batch_dependence(model, source, batch_size=10, keep_outputs=True)
        assert r.accuracy == ref.accuracy and r.purity == ref.purity and r.batch_dependent is False
        for o in ref.outputs:
            torch.testing.assert_close(r.outputs[o], ref.outputs[o], rtol=0, atol=1e-6)
    # labels read once per source, then one read per sample per pass (3 orderings + the repeat): batch by
    # batch through the loader, never the dataset at once
    assert ds.reads == [2 * (1 + 4)] * 40
    acc = analysis.evaluate_accuracy(model, torch.utils.data.DataLoader(ds), ordering="sorted")
    assert acc == ref.accuracy["sorted"]
    settings = analysis.TrainSettings(epochs=2, batch_size=8)
    a, b = tiny_vit(False), tiny_vit(False)
    assert analysis.train_classifier(a, x, y, settings) == analysis.train_classifier(b, _Counting(x, y), None, settings)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    feats = torch.randn(40, 5, 6, generator=torch.Generator().manual_seed(1))
    d1 = analysis.entropy_diagnostics(feats, y, "optimal", folds=2)
    d2 = analysis.entropy_diagnostics(torch.utils.data.TensorDataset(feats, y), None, "optimal", folds=2)
    assert d1.to_dict() == d2.to_dict()
    with pytest.raises(nk.ShapeError, match="map-style Dataset"):
        analysis.batch_dependence(model, object(), y)
    with pytest.raises(nk.ConfigError, match="carries no labels"):
        analysis.train_classifier(tiny_vit(False), x, None, settings)


def test_accuracy_and_orderings(data):
    x, y = data
    model = tiny_vit(False)
    r = analysis.batch_dependence(model, x, y, batch_size=7, orderings=("sorted", "given"), keep_outputs=True)
    expected = float((r.outputs["given"].argmax(-1) == y).double().mean())
    assert r.accuracy["given"] == pytest.approx(expected)
    batches = analysis.ordering_batches(40, "sorted", 7, y)
    assert [len(b) for b in batches] == [7] * 5 + [5]
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == list(range(40))
    assert (y[flat][1:] >= y[flat][:-1]).all(), "class-sorted"
    s1 = analysis.ordering_batches(40, "shuffled", 10, seed=1)
    assert torch.equal(torch.cat(s1), torch.cat(analysis.ordering_batches(40, "shuffled", 10, seed=1)))
    assert not torch.equal(torch.cat(s1), torch.arange(40))


def test_batch_dependence_argument_errors(data):
    x, y = data
    model = tiny_vit(False)
    with pytest.raises(nk.ConfigError, match="targets"):
        analysis.batch_dependence(model, x)
    with pytest.raises(nk.ConfigError, match="at least two"):
        analysis.batch_dependence(model, x, y, orderings=("sorted",))
    with pytest.raises(nk.ConfigError, match="at least two"):
        analysis.batch_dependence(model, x, y, orderings=("sorted", "backwards"))
    with pytest.raises(nk.ShapeError, match="40 class labels"):
        analysis.batch_dependence(model, x, y[:5])
    with pytest.raises(nk.ConfigError, match="batch_size"):
        analysis.batch_dependence(model, x, y, batch_size=0)
    with pytest.raises(nk.ConfigError, match="nn.Module"):
        analysis.batch_dependence(lambda t: t, x, y)
    # Without targets the orderings that need none still work, with no accuracies.
    r = analysis.batch_dependence(model, x, orderings=("shuffled", "single"))
    assert r.accuracy == {} and r.batch_dependent is False


# --------------------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------------------
def test_entropy_change_matches_slogdet():
    assert analysis.entropy_change is quality.entropy_change
    g = torch.Generator().manual_seed(0)
    M = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert analysis.entropy_change(M) == pytest.approx(-torch.linalg.slogdet(M)[1].item(), abs=1e-12)
    for k in (1, 2, 7, 16):
        for kind, closed in (("optimal", quality.optimal_entropy_change(k)),
                             ("shift", quality.shift_entropy_change(k, 0.3))):
            Mk = quality.mixing_matrix(kind, k, 0.3)
            assert analysis.entropy_change(Mk) == pytest.approx(-torch.linalg.slogdet(Mk)[1].item(), abs=1e-10)
            assert analysis.entropy_change(Mk) == pytest.approx(closed, abs=1e-10)
    assert analysis.entropy_change(torch.zeros(3, 3)) == math.inf


def _two_gaussians_1d(mu, n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    z = (2 * y - 1).double() * mu + torch.randn(n, dtype=torch.float64, generator=g)
    return z[:, None], y


def test_conditional_entropy_two_gaussians_known_answer():
    mu = 1.0
    z, y = _two_gaussians_1d(mu, 20000, seed=3)
    # H(Y|Z) = E_z[h(sigmoid(2 mu z))] for equal priors and unit variances, by quadrature.
    t = torch.linspace(-14, 14, 40001, dtype=torch.float64)
    pz = 0.5 * (torch.exp(-(t - mu) ** 2 / 2) + torch.exp(-(t + mu) ** 2 / 2)) / math.sqrt(2 * math.pi)
    p = torch.sigmoid(2 * mu * t)
    true = float(torch.trapezoid(pz * -(p * p.log() + (1 - p) * (1 - p).log()), t))
    assert 0.3 < true < 0.4
    for cov in ("shared", "per_class"):
        est = analysis.conditional_entropy_gaussian(z, y, covariance=cov, shrinkage=0.0)
        assert est == pytest.approx(true, abs=0.02), cov
    # The paper's joint-Gaussian formula: residual variance of the label indicator is 1 / (4 (mu^2 + 1)).
    joint = analysis.conditional_entropy_gaussian(z, y, method="joint", shrinkage=0.0)
    assert joint == pytest.approx(0.5 * math.log(2 * math.pi * math.e / (4 * (mu ** 2 + 1))), abs=0.02)


def test_conditional_entropy_limits():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3000) % 3
    noise = torch.randn(3000, 4, dtype=torch.float64, generator=g)
    uninformative = analysis.conditional_entropy_gaussian(noise, y)
    assert analysis.label_entropy(y) == pytest.approx(math.log(3))
    assert uninformative == pytest.approx(math.log(3), abs=0.02)
    separated = noise + 50.0 * torch.nn.functional.one_hot(y, 4).double()
    assert analysis.conditional_entropy_gaussian(separated, y) < 1e-3
    # In-sample scoring is never above the held-out estimate by much on this easy problem.
    assert analysis.conditional_entropy_gaussian(noise, y, folds=0) <= uninformative + 1e-3


def test_calibration_bounds_overconfident_fits_and_leaves_good_ones_alone():
    z, y = _two_gaussians_1d(1.0, 4000, seed=4)
    raw = analysis.conditional_entropy_gaussian(z, y, calibrate=False, shrinkage=0.0)
    assert analysis.conditional_entropy_gaussian(z, y, shrinkage=0.0) == pytest.approx(raw, abs=2e-3)
    # Two tight clusters, 10% of one cluster's labels swapped: the Gaussian fit is far too sure of every
    # point and pays heavily for the swapped ones; one fitted temperature brings it near the truth.
    g = torch.Generator().manual_seed(0)
    y2 = torch.arange(2000) % 2
    z2 = (2 * y2 - 1).double()[:, None] * 5 + 0.01 * torch.randn(2000, 1, dtype=torch.float64, generator=g)
    flipped = y2.clone()
    flipped[::20] = 1  # 100 of the 1000 points of the cluster at -5 now say class 1
    raw = analysis.conditional_entropy_gaussian(z2, flipped, calibrate=False)
    cal = analysis.conditional_entropy_gaussian(z2, flipped)
    h_true = 0.5 * -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))  # the label noise is all that is left
    assert raw > h_true + 0.2
    assert h_true - 0.01 < cal < h_true + 0.03


def test_gaussian_entropy_known_answer_and_ledoit_wolf():
    g = torch.Generator().manual_seed(0)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [0.2, -0.3, 0.5]], dtype=torch.float64)
    z = torch.randn(20000, 3, dtype=torch.float64, generator=g) @ A.T
    true = 0.5 * (3 * math.log(2 * math.pi * math.e) + math.log(torch.linalg.det(A @ A.T).item()))
    assert analysis.gaussian_entropy(z) == pytest.approx(true, abs=0.03)
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    x = torch.randn(50, 30, dtype=torch.float64, generator=g) @ torch.randn(30, 30, dtype=torch.float64, generator=g)
    cov, s = analysis.shrunk_covariance(x - x.mean(0), "auto", dof=50)
    ref_cov, ref_s = sklearn_cov.ledoit_wolf(x.numpy())
    assert s == pytest.approx(ref_s, abs=1e-12) and 0 < s < 1
    torch.testing.assert_close(cov, torch.as_tensor(ref_cov), atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def class_features():
    # (N, C, H, W) = (600, 1, 4, 4) features whose class means differ: H(Y|Z) is well inside (0, ln 3).
    g = torch.Generator().manual_seed(1)
    y = torch.arange(600) % 3
    means = 0.3 * torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    x = means[y] + torch.randn(600, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("noise", [dict(kind="optimal", axis="tokens"), dict(kind="shift", axis="rows", alpha=0.3)],
                         ids=["optimal-tokens", "shift-rows"])
def test_sample_local_mix_keeps_H_Y_given_Z_and_shifts_H_Z_by_dS(noise, class_features):
    x, y = class_features
    d = analysis.entropy_diagnostics(x, y, noise, shrinkage=0.0)
    k = 16 if noise["axis"] == "tokens" else 4
    assert d.k == k
    assert d.delta_S == pytest.approx(quality.entropy_change(quality.mixing_matrix(noise["kind"], k, 0.3)))
    assert 0.2 < d.H_Y_given_Z_before < math.log(3) - 0.05
    assert abs(d.H_Y_given_Z_change) < 1e-8, "an invertible per-sample map cannot change H(Y|Z)"
    assert d.expected_H_Z_change == pytest.approx(-(16 / k) * d.delta_S)
    assert d.H_Z_after - d.H_Z_before == pytest.approx(d.expected_H_Z_change, abs=1e-8)


def test_batch_mix_in_sorted_batches_leaks_labels_random_noise_destroys_them(class_features):
    x, y = class_features
    batch_noise = nk.NoiseConfig(kind="optimal", axis="batch", allow_batch_dependence=True)
    srt = analysis.entropy_diagnostics(x, y, batch_noise, ordering="sorted", batch_size=10)
    shf = analysis.entropy_diagnostics(x, y, batch_noise, ordering="shuffled", batch_size=10)
    assert srt.k == 10 and srt.delta_S == pytest.approx(quality.optimal_entropy_change(10))
    assert srt.H_Y_given_Z_after < 0.5 * srt.H_Y_given_Z_before, "same-class pooling makes labels readable"
    assert shf.H_Y_given_Z_after > srt.H_Y_given_Z_after + 0.1
    gauss = analysis.entropy_diagnostics(x, y, dict(kind="gaussian", strength=2.0))
    assert gauss.delta_S is None and gauss.k is None
    assert gauss.H_Y_given_Z_change > 0.05
    with pytest.raises(nk.BatchDependenceError):
        analysis.entropy_diagnostics(x, y, dict(kind="optimal", axis="batch"))


def test_entropy_argument_errors(class_features):
    x, y = class_features
    flat = x.reshape(600, -1)
    with pytest.raises(nk.ShapeError, match="singular"):
        analysis.gaussian_entropy(torch.cat([flat, flat[:, :1]], 1))
    with pytest.raises(nk.ShapeError, match="at least 2 classes"):
        analysis.conditional_entropy_gaussian(flat, torch.zeros(600, dtype=torch.long))
    with pytest.raises(nk.ConfigError, match="method"):
        analysis.conditional_entropy_gaussian(flat, y, method="mutual")
    with pytest.raises(nk.ShapeError, match="folds"):
        analysis.conditional_entropy_gaussian(flat[:6], y[:6], folds=5)
    with pytest.raises(nk.ConfigError, match="shrinkage"):
        analysis.gaussian_entropy(flat, shrinkage=2.0)
    with pytest.raises(nk.ShapeError, match="integer class labels"):
        analysis.conditional_entropy_gaussian(flat, y.double())
    with pytest.raises(nk.ConfigError, match="left out"):
        analysis.apply_noise(x, nk.NoiseConfig(kind="optimal", axis="batch", eval=False), batches=[torch.arange(5)])


# --------------------------------------------------------------------------------------------------
# training and layer sensitivity
# --------------------------------------------------------------------------------------------------
def test_train_classifier_lowers_the_loss(data):
    x, y = data
    model = tiny_vit(False)
    losses = analysis.train_classifier(model, x, y, analysis.TrainSettings(epochs=15, batch_size=10, lr=5e-3))
    assert len(losses) == 15 and not model.training
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(nk.ConfigError, match="epochs"):
        analysis.TrainSettings(epochs=-1)


def test_layer_sensitivity_returns_one_entry_per_block(data):
    x, y = data
    settings = analysis.TrainSettings(epochs=1, batch_size=10)
    ls = analysis.layer_sensitivity(lambda: tiny_vit(False, depth=3), dict(kind="optimal", axis="tokens"), (x, y),
                                    (x, y), settings=settings, orderings=("shuffled", "single"), baseline=True)
    assert ls.layers == [0, 1, 2]
    assert all(len(v) == 3 for v in ls.accuracy.values()) and set(ls.accuracy) == {"shuffled", "single"}
    assert all(0.0 <= a <= 1.0 for a in ls.accuracy["shuffled"])
    assert ls.accuracy["shuffled"] == ls.accuracy["single"], "sample-local noise: ordering does not matter"
    assert len(set(ls.final_loss)) == 3, "the noise sits in a different block in each run"
    assert set(ls.baseline_accuracy) == {"shuffled", "single"}
    assert json.loads(json.dumps(ls.to_dict()))["layers"] == [0, 1, 2]
    # An eval-only batch-axis noise: one training run, the noise moved; sorted batches differ from shuffled.
    off = analysis.layer_sensitivity(lambda: tiny_vit(False, depth=3),
                                     nk.NoiseConfig.official_vit(allow_batch_dependence=True), (x, y), (x, y),
                                     settings=settings, orderings=("sorted", "shuffled"))
    assert off.layers == [0, 1, 2] and len(set(off.final_loss)) == 1
    assert len(off.accuracy["sorted"]) == 3
    with pytest.raises(nk.ConfigError, match="out of range"):
        analysis.layer_sensitivity(lambda: tiny_vit(False, depth=3), "optimal", (x, y), (x, y), layers=[3],
                                   settings=settings)


# --------------------------------------------------------------------------------------------------
# the experiment and the CLI
# --------------------------------------------------------------------------------------------------
def test_cli_audit_fast_writes_report_json_and_plots(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "audit"
    threads = torch.get_num_threads()
    assert cli_main(["audit", "--fast", "--out", str(out), "--quiet"]) == 0
    assert torch.get_num_threads() == threads, "the audit restores torch's thread count"
    assert "report.md" in capsys.readouterr().out
    for name in ("report.md", "audit.json", "accuracy_by_ordering.png", "official_batch_size.png",
                 "layer_sensitivity.png", "entropy.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "audit.json").read_text())
    assert set(result["conditions"]) == {"none", "optimal/tokens", "optimal/rows", "shift/tokens", "shift/rows",
                                         "official", "gaussian", "salt_and_pepper", "salt_and_pepper/batch"}
    sm = result["summary"]
    for name in ("none", "optimal/tokens", "optimal/rows", "shift/tokens", "shift/rows"):
        assert sm[name]["batch_dependent"] is False, name
        assert sm[name]["max_logit_diff"] <= sm[name]["tolerance"], name
    assert sm["official"]["batch_dependent"] is True
    # random noises, compared on the same draws: each sample's own range is batch-independent, the batch's is not
    for name, dependent in (("gaussian", False), ("salt_and_pepper", False), ("salt_and_pepper/batch", True)):
        assert sm[name]["stochastic"] and sm[name]["batch_dependent"] is dependent, name
        assert (sm[name]["paired_max_logit_diff"] > sm[name]["tolerance"]) is dependent, name
    assert result["environment"]["torch"] == torch.__version__
    assert len(result["layer_sensitivity"]["optimal/tokens"][0]["layers"]) == audit.MODEL["depth"]
    report = (out / "report.md").read_text()
    assert "## Environment" in report and torch.__version__ in report and "smoke run" in report
    assert "| `official` |" in report and "no (same draws)" in report and "**yes** (same draws)" in report


def test_cli_audit_rejects_bad_options(tmp_path, capsys):
    assert cli_main(["audit", "--seeds", "0", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "seeds" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,category", [
    ("noisynn::mix_add_layernorm", "noisynn"), ("autograd::engine::evaluate_function: noisynn::x", "noisynn"),
    ("mix_add_layernorm_fwd_kernel", "noisynn"), ("aten::native_layer_norm", "layernorm_add"),
    ("NativeLayerNormBackward0", "layernorm_add"), ("aten::add", "layernorm_add"), ("aten::add_", "layernorm_add"),
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("AddmmBackward0", "matmul"),
    ("aten::mkldnn_convolution", "matmul"), ("sm90_xmma_gemm_f32", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_softmax", "attention"),
    ("aten::gelu", "rest"), ("Optimizer.step#AdamW.step", "rest"), ("aten::copy_", "rest"),
])
def test_profile_classifies_operator_names(name, category):
    assert classify(name) == category


def test_profile_training_shares_sum_to_one(tmp_path):
    model = tiny_vit(dict(kind="optimal", axis="tokens"))
    nk.swap_fused_ops(model)
    r = analysis.profile_training(model, batch_size=4, steps=2, warmup=1, trace_path=str(tmp_path / "t.json"))
    assert r.input_size == (1, 8, 8) and r.batch_size == 4 and r.steps == 2
    assert sum(r.shares.values()) == pytest.approx(1.0, abs=1e-12)
    assert sum(r.ms_per_step.values()) == pytest.approx(r.profiled_ms_per_step)
    assert r.shares["noisynn"] > 0 and r.images_per_second == pytest.approx(4 / r.step_seconds)
    assert json.load(open(tmp_path / "t.json"))["traceEvents"]
    with pytest.raises(nk.ConfigError, match="input_size"):
        analysis.profile_training(model, input_size=(1, 8))
