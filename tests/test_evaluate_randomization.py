"""fastsal.evaluate.similarity and fastsal.evaluate.randomization: MPRT, data randomization, RandomLogit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

from fastsal.evaluate import randomization as R
from fastsal.evaluate import similarity as S

skimage = pytest.importorskip("skimage")
from skimage.feature import hog as sk_hog  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

SIZE = 24


class SmallBNNet(nn.Module):
    """conv/BN/ReLU/pool, conv/BN/ReLU, global average pool, linear: 24x24 RGB -> 5 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)
        self.unused = nn.Linear(2, 2)  # holds parameters, never called

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def small_model(seed: int = 0, affine_default: bool = False) -> SmallBNNet:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallBNNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.2)
            if not affine_default:
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    return model.eval()


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----- similarity -----------------------------------------------------------------------------------


def test_spearman_equals_scipy_per_image_and_nan_for_constant_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 9, 7))
    b = a + rng.normal(size=a.shape)
    a[1, :4] = 0.0  # ties
    b[3] = 2.0  # constant
    got = S.spearman(a, b)
    for i in range(5):
        if i == 3:
            assert np.isnan(got[i])
            continue
        want = stats.spearmanr(a[i].ravel(), b[i].ravel())[0]
        assert got[i] == pytest.approx(want, abs=1e-12)
    assert S.spearman(torch.from_numpy(a), torch.from_numpy(a))[0] == pytest.approx(1.0)


def test_normalizations_follow_adebayo():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(3, 20, 20))
    m[2] = 0.0
    p99 = np.percentile(np.abs(m[0]), 99)
    gray = S.grayscale_99(m)
    assert np.allclose(gray[0], np.minimum(np.abs(m[0]) / p99, 1.0))
    assert gray.min() >= 0 and gray.max() == 1.0
    div = S.diverging_99(m)
    assert np.allclose(div[0], np.clip(m[0] / p99, -1, 1))
    assert (div[0] < 0).any()
    assert np.all(gray[2] == 0) and np.all(div[2] == 0)  # an all-zero map stays zero
    mm = S.minmax01(m)
    assert np.allclose(mm[:2].reshape(2, -1).min(1), 0) and np.allclose(mm[:2].reshape(2, -1).max(1), 1)


def test_compare_ssim_and_hog_equal_skimage_on_the_same_normalized_maps():
    g = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)).double()
    h = g + 0.7 * torch.randn(g.shape, generator=torch.Generator().manual_seed(3)).double()
    got = S.compare(g, h)
    assert set(got) == set(S.SIMILARITIES)

    def gray(t):  # written here again: max_c |g|, clipped at its 99th percentile, divided, then min-max
        a = t.abs().amax(1).numpy()
        out = []
        for m in a:
            m = np.minimum(m / np.percentile(m, 99), 1.0)
            out.append((m - m.min()) / (m.max() - m.min()))
        return out

    def div(t):
        s = t.sum(1).numpy()
        return [np.clip(m / np.percentile(np.abs(m), 99), -1, 1) for m in s]

    cell = (max(4, SIZE // 8),) * 2
    for i, (x, y) in enumerate(zip(gray(g), gray(h))):
        want = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
        assert got["ssim"][i] == pytest.approx(want, abs=1e-12)
        hx = sk_hog(x, orientations=9, pixels_per_cell=cell, cells_per_block=(2, 2), block_norm="L2-Hys")
        hy = sk_hog(y, orientations=9, pixels_per_cell=cell, cells_per_block=(2, 2), block_norm="L2-Hys")
        assert got["hog"][i] == pytest.approx(stats.spearmanr(hx, hy)[0], abs=1e-12)
        xa = g[i].abs().amax(0).numpy()
        ya = h[i].abs().amax(0).numpy()
        want_rank = stats.spearmanr(np.minimum(xa / np.percentile(xa, 99), 1).ravel(),
                                    np.minimum(ya / np.percentile(ya, 99), 1).ravel())[0]
        assert got["rank_abs"][i] == pytest.approx(want_rank, abs=1e-12)
    for i, (x, y) in enumerate(zip(div(g), div(h))):
        assert got["rank_noabs"][i] == pytest.approx(stats.spearmanr(x.ravel(), y.ravel())[0], abs=1e-12)


# ----- MPRT -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,convention", [("cascading", "adebayo"), ("independent", "quantus")])
def test_mprt_never_touches_the_users_model_nor_the_random_state(mode, convention):
    model = small_model()
    before = state(model)
    rng_before = torch.get_rng_state()
    x = images(4)
    R.mprt(model, x, methods=("guided",), mode=mode, convention=convention, target=[0, 1, 2, 3],
           similarities=("rank_abs",))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not model.training
    assert torch.equal(rng_before, torch.get_rng_state())


def test_cascading_steps_are_the_called_layers_output_first_and_original_is_excluded():
    model = small_model()
    res = R.mprt(model, images(6), methods=("gradient", "guided"), similarities=("rank_abs", "ssim"), batch_size=4)
    assert res.check == "mprt-cascading"
    assert res.steps == ("fc", "bn2", "conv2", "bn1", "conv1")
    assert res.info["skipped"] == ["unused"]
    for m in res.methods:
        for metric in res.similarities:
            assert res.scores[m][metric].shape == (5, 6)
            assert np.all(res.original[m][metric] == 1.0)
            assert np.array_equal(res.score(m, "original", metric), res.original[m][metric])
            s = res.scores[m][metric]
            summary = res.summary()[m][metric]
            assert np.allclose(summary["mean"], s.mean(axis=1)) and np.allclose(summary["std"], s.std(axis=1))
            assert list(summary["n"]) == [6] * 5
            # the unrandomized 1.0 is not averaged in (Quantus 0.6 does)
            assert res.overall(m, metric) == pytest.approx(s.mean())
            assert res.overall(m, metric) < np.concatenate([s.ravel(), np.ones(6)]).mean()
    # by the last step every layer is random: the gradient map is far from the original
    assert res.summary()["gradient"]["rank_abs"]["mean"][-1] < 0.9
    rows = res.rows(include_original=True)
    assert len(rows) == 2 * 2 * 6 and rows[0]["step"] == "original" and rows[0]["mean"] == 1.0
    assert set(rows[0]) == {"check", "method", "step", "metric", "mean", "std", "n"}


def test_independent_differs_from_cascading_but_shares_the_first_step():
    model, x = small_model(), images(6)
    kw = dict(methods=("gradient",), similarities=("rank_abs", "rank_noabs"), seed=3)
    cas = R.mprt(model, x, mode="cascading", **kw)
    ind = R.mprt(model, x, mode="independent", **kw)
    assert cas.steps == ind.steps
    for metric in kw["similarities"]:
        # step 0 re-initializes the output layer only, with the same seed, in both modes
        assert np.array_equal(cas.scores["gradient"][metric][0], ind.scores["gradient"][metric][0])
        assert not np.allclose(cas.scores["gradient"][metric][2:], ind.scores["gradient"][metric][2:])
    again = R.mprt(model, x, mode="cascading", **kw)  # seeded: reproducible
    assert np.array_equal(again.scores["gradient"]["rank_abs"], cas.scores["gradient"]["rank_abs"])


def test_conventions_bn_running_statistics_kept_or_reset():
    # BN affine parameters at their initial values: resetting them (adebayo) changes nothing,
    # resetting the running statistics too (quantus) changes the model
    model, x = small_model(affine_default=True), images(6)
    y = [0, 1, 2, 3, 4, 0]
    kw = dict(methods=("gradient",), mode="independent", target=y, similarities=("rank_abs",))
    ade = R.mprt(model, x, convention="adebayo", **kw)
    qua = R.mprt(model, x, convention="quantus", **kw)
    for bn in ("bn1", "bn2"):
        assert np.allclose(ade.score("gradient", bn, "rank_abs"), 1.0)
        assert qua.score("gradient", bn, "rank_abs").mean() < 0.99
    assert ade.info["seeds"] == [0, 1, 2, 3, 4] and qua.info["seeds"] == [1] * 5


def test_adebayo_explains_each_models_own_top_class():
    model, x = small_model(), images(6)
    res = R.mprt(model, x, methods=("gradient",), similarities=("rank_abs",), mode="independent")
    # the same as passing, per step, the randomized model's predicted classes: check the first step
    twin = __import__("copy").deepcopy(model)
    R._reset(twin.fc, "fc", "adebayo", 0)
    own = twin(x).argmax(1)
    base = R._gradients(model, x, None, ("gradient",), None)["gradient"]
    fixed = R._gradients(twin, x, own, ("gradient",), None)["gradient"]
    assert np.allclose(res.scores["gradient"]["rank_abs"][0], S.compare(base, fixed, ("rank_abs",))["rank_abs"])


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(similarities=("rank_abs", "pearson")), ["'pearson'", "'rank_abs'", "'rank_noabs'", "'ssim'", "'hog'"]),
        (dict(methods=("gradient", "lrp")), ["'lrp'", "'gradient'", "'deconvnet'", "'guided'"]),
        (dict(convention="captum"), ["'captum'", "'adebayo'", "'quantus'"]),
        (dict(mode="bottom_up"), ["'bottom_up'", "'cascading'", "'independent'"]),
        (dict(convention="quantus"), ["target"]),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, words):
    with pytest.raises(ValueError) as err:
        R.mprt(small_model(), images(2), **kwargs)
    for w in words:
        assert w in str(err.value)


def test_bad_arguments_of_the_other_checks():
    model, x = small_model(), images(2)
    with pytest.raises(ValueError, match="'ssim'"):
        R.data_randomization(model, model, x, similarities=("mse",))
    with pytest.raises(ValueError, match="labels"):
        R.random_logit(model, x, None)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        R.random_logit(model, x, [0, 7])
    with pytest.raises(ValueError, match="'guided'"):
        R.random_logit(model, x, [0, 1], methods=("smoothgrad",))


# ----- data randomization, RandomLogit --------------------------------------------------------------


def test_data_randomization_same_model_scores_one_other_model_less():
    x = images(6)
    true, permuted = small_model(0), small_model(5)
    before = state(true)
    same = R.data_randomization(true, true, x, methods=("gradient", "guided"))
    assert same.steps == ("permuted-labels",) and same.check == "data-randomization"
    for m in same.methods:
        for metric in same.similarities:
            assert np.allclose(same.scores[m][metric], 1.0)
    diff = R.data_randomization(true, permuted, x, methods=("gradient",), similarities=("rank_abs",))
    assert diff.scores["gradient"]["rank_abs"].shape == (1, 6)
    assert diff.summary()["gradient"]["rank_abs"]["mean"][0] < 0.9
    assert all(torch.equal(v, true.state_dict()[k]) for k, v in before.items())


def test_random_logit_picks_a_seeded_other_class():
    model, x = small_model(), images(8)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    res = R.random_logit(model, x, y, methods=("gradient", "guided"), seed=7)
    other = res.info["other"]
    assert other.shape == (8,) and np.all(other != y.numpy()) and np.all((other >= 0) & (other < 5))
    again = R.random_logit(model, x, y, methods=("gradient",), seed=7, similarities=("rank_abs",))
    assert np.array_equal(again.info["other"], other)
    assert np.array_equal(again.scores["gradient"]["rank_abs"], res.scores["gradient"]["rank_abs"])
    assert res.scores["guided"]["ssim"].shape == (1, 8)
    assert np.all(res.scores["gradient"]["rank_abs"] < 1.0)


# ----- Quantus cross-check --------------------------------------------------------------------------


def test_spearman_mprt_equals_quantus_in_quantus_mode():
    quantus = pytest.importorskip("quantus")
    from fastsal import saliency

    model, x = small_model(), images(32, seed=4)
    y = model(x).argmax(1).numpy()

    def explain(model, inputs, targets, **kwargs):
        maps = saliency(model, torch.as_tensor(inputs), target=torch.as_tensor(targets).long(),
                        method="gradient", reduce="abs_max")
        return maps[:, None].numpy()

    metric = quantus.MPRT(layer_order="top_down", seed=11, disable_warnings=True, display_progressbar=False)
    # Quantus reseeds the global generator; keep the test suite's random state as it was
    with torch.random.fork_rng():
        theirs = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=explain,
                        channel_first=True, device="cpu", batch_size=16)
    ours = R.mprt(model, x, methods=("gradient",), convention="quantus", target=y, seed=11,
                  similarities=("rank_abs",), batch_size=16)
    # Quantus lists every module with reset_parameters in definition order (the unused one too)
    steps = [s for s in theirs if s not in ("original", "unused")]
    assert tuple(steps) == ours.steps
    assert np.allclose(theirs["original"], 1.0)
    for step in ours.steps:
        assert np.allclose(ours.score("gradient", step, "rank_abs"), theirs[step], atol=1e-6, rtol=0), step
    assert ours.summary()["gradient"]["rank_abs"]["mean"][-1] < 0.9  # the comparison is not vacuous
