"""Tests for scratchvae.figures, run against small fake models in NumPy."""
import json
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from scratchvae import figures  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeBackend:
    """The two backend methods the figures use, on NumPy."""

    name = "numpy"

    def asarray(self, a, dtype=None):
        return np.asarray(a, dtype=dtype)

    def asnumpy(self, a):
        return np.asarray(a)


class FakeModel:
    """Linear encoder, linear decoder with a sigmoid.

    ``mu = (x - 0.5) @ W_enc * scales``; with i.i.d. pixels every unit-norm
    column of ``W_enc`` gives ``Var[x @ w] = Var[pixel]``, so ``Var[mu_j]``
    is ordered like ``scales ** 2``.
    """

    def __init__(self, latent_dim=2, input_shape=(1, 8, 8), scales=None, ae=False, seed=0):
        g = np.random.default_rng(seed)
        self.latent_dim = latent_dim
        self.input_shape = input_shape
        self.backend = FakeBackend()
        self.dtype = np.dtype(np.float32)
        d = int(np.prod(input_shape))
        w = g.standard_normal((d, latent_dim))
        self.w_enc = w / np.linalg.norm(w, axis=0)
        self.scales = np.ones(latent_dim) * 4.0 if scales is None else np.asarray(scales, float)
        self.w_dec = g.standard_normal((latent_dim, d)) * 1.5
        self.b_dec = g.standard_normal(d) * 0.5
        self.ae = ae
        self.calls = {"encode": [], "decode": []}

    def encode(self, x):
        assert x.ndim == 2 and x.dtype == self.dtype
        self.calls["encode"].append(x.shape[0])
        mu = ((x - 0.5) @ self.w_enc * self.scales).astype(self.dtype)
        return mu, (None if self.ae else np.full_like(mu, -1.0))

    def decode(self, z):
        assert z.ndim == 2 and z.shape[1] == self.latent_dim
        self.calls["decode"].append(z.shape[0])
        return (1.0 / (1.0 + np.exp(-(z @ self.w_dec + self.b_dec)))).astype(self.dtype)

    def sample(self, n, rng):
        return self.decode(rng.standard_normal((n, self.latent_dim)).astype(self.dtype))

    def reconstruct(self, x):
        return self.decode(self.encode(x)[0])


def make_data(n=300, shape=(1, 8, 8), seed=1):
    g = np.random.default_rng(seed)
    x = g.random((n, int(np.prod(shape)))).astype(np.float32)
    labels = g.integers(0, 10, size=n)
    return x, labels


HISTORY = [
    {"epoch": 1, "train_loss": 200.0, "test_loss": 190.0, "train_recon": 180.0,
     "test_recon": 172.0, "train_kl": 20.0, "test_kl": 18.0},
    {"epoch": 2, "train_loss": 150.0, "test_loss": 152.0, "train_recon": 125.0,
     "test_recon": 128.0, "train_kl": 25.0, "test_kl": 24.0},
    {"epoch": 3, "train_loss": 130.0, "test_loss": 140.0, "train_recon": 104.0,
     "test_recon": 113.0, "train_kl": 26.0, "test_kl": 27.0},
]


def assert_png(path, min_h=100, min_w=100):
    assert os.path.isfile(path)
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w
    assert img[..., :3].std() > 0.01  # not a blank canvas
    return img


def no_temp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp") or f.startswith(".")]


# --------------------------------------------------------------------------- image_grid

@pytest.mark.parametrize("n,ncols,pad", [(10, 4, 1), (16, 16, 1), (1, 1, 0), (7, 3, 2), (3, 5, 1)])
def test_image_grid_shape(n, ncols, pad):
    h, w = 5, 7
    out = figures.image_grid(np.zeros((n, 1, h, w)), ncols, pad=pad)
    rows = -(-n // ncols)
    assert out.shape == (rows * h + (rows - 1) * pad, ncols * w + (ncols - 1) * pad)


def test_image_grid_placement_and_fill():
    imgs = np.stack([np.full((3, 4), v) for v in (0.1, 0.2, 0.3)])  # (N, H, W) form
    out = figures.image_grid(imgs, 2, pad=1, pad_value=0.5)
    assert out.shape == (7, 9)
    assert np.all(out[0:3, 0:4] == 0.1)
    assert np.all(out[0:3, 5:9] == 0.2)
    assert np.all(out[4:7, 0:4] == 0.3)
    assert np.all(out[4:7, 5:9] == 0.5)      # empty cell
    assert np.all(out[3, :] == 0.5) and np.all(out[:, 4] == 0.5)  # gaps


def test_image_grid_clips_and_rgb():
    out = figures.image_grid(np.full((2, 1, 2, 2), 3.0), 2)
    assert out.max() == 1.0
    rgb = figures.image_grid(np.random.default_rng(0).random((5, 3, 4, 4)), 3)
    assert rgb.shape == (2 * 4 + 1, 3 * 4 + 2, 3)


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        figures.image_grid(np.zeros((0, 1, 2, 2)), 2)
    with pytest.raises(ValueError):
        figures.image_grid(np.zeros((2, 2, 2, 2)), 2)
    with pytest.raises(ValueError):
        figures.image_grid(np.zeros((2, 1, 2, 2)), 0)


# --------------------------------------------------------------------------- figures

@pytest.mark.parametrize("latent_dim,ae", [(2, False), (5, False), (2, True), (1, False)])
def test_save_all(tmp_path, latent_dim, ae):
    model = FakeModel(latent_dim=latent_dim, ae=ae)
    x, labels = make_data()
    out = tmp_path / "figs"
    res = figures.save_all(model, out, x, np.random.default_rng(0), labels=labels,
                           history=HISTORY)
    names = {"samples", "reconstructions", "curves", "latent", "manifold", "interpolation"}
    assert set(res) == names
    assert sorted(os.listdir(out)) == sorted(n + ".png" for n in names)
    for name in names:
        assert_png(out / f"{name}.png")
    json.dumps(res)  # summary.json-ready
    assert res["latent"]["projection"] == ("pca" if latent_dim > 2 else "identity")
    # batching bound respected everywhere
    assert max(model.calls["encode"] + model.calls["decode"]) <= figures.BATCH


def test_save_all_without_history_or_labels(tmp_path):
    model = FakeModel(latent_dim=3)
    x, _ = make_data(n=50)
    res = figures.save_all(model, tmp_path, x, np.random.default_rng(0))
    assert "curves" not in res
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["samples.png", "reconstructions.png", "latent.png", "manifold.png", "interpolation.png"])
    assert res["interpolation"]["attribute"] is None


def test_flat_input_shape_is_drawn_square(tmp_path):
    model = FakeModel(latent_dim=2, input_shape=(64,))
    x, _ = make_data(n=20)
    figures.plot_reconstructions(model, x, tmp_path / "r.png", n=8)
    assert_png(tmp_path / "r.png")
    with pytest.raises(ValueError):
        figures.plot_samples(FakeModel(input_shape=(60,)), tmp_path / "s.png",
                             np.random.default_rng(0), n=4)
    assert os.listdir(tmp_path) == ["r.png"]


def test_plot_samples(tmp_path):
    model = FakeModel()
    res = figures.plot_samples(model, tmp_path / "s.png", np.random.default_rng(0), n=10)
    assert res["n"] == 10 and res["ncols"] == 4
    assert 0.0 <= res["mean_intensity"] <= 1.0
    assert res["pixel_std_across_samples"] > 0
    assert_png(tmp_path / "s.png")
    # explicit rng -> reproducible
    r1 = figures.plot_samples(model, tmp_path / "a.png", np.random.default_rng(5), n=9)
    r2 = figures.plot_samples(model, tmp_path / "b.png", np.random.default_rng(5), n=9)
    assert r1["mean_intensity"] == r2["mean_intensity"]


def test_plot_reconstructions(tmp_path):
    model = FakeModel(input_shape=(1, 28, 28))
    x, _ = make_data(n=40, shape=(1, 28, 28))
    res = figures.plot_reconstructions(model, x.reshape(40, 1, 28, 28), tmp_path / "r.png", n=32)
    assert res["n"] == 32 and res["mse"] > 0
    img = assert_png(tmp_path / "r.png", min_h=150, min_w=400)
    assert img.shape[1] > img.shape[0]  # 4 rows of 16: wide
    # fewer images than asked
    res = figures.plot_reconstructions(model, x[:5], tmp_path / "r5.png", n=16)
    assert res["n"] == 5


@pytest.mark.parametrize("history", [HISTORY, HISTORY[:1]])
def test_plot_curves(tmp_path, history):
    res = figures.plot_curves(history, tmp_path / "c.png")
    assert res["epochs"] == len(history)
    assert res["best_epoch"] == (3 if len(history) == 3 else 1)
    assert res["last"]["test_loss"] == history[-1]["test_loss"]
    assert_png(tmp_path / "c.png", min_w=600)


def test_plot_curves_autoencoder_history(tmp_path):
    hist = [{"epoch": e, "train_loss": 100.0 / e, "test_loss": 110.0 / e,
             "test_recon": 110.0 / e, "test_kl": None} for e in (1, 2)]
    res = figures.plot_curves(hist, tmp_path / "c.png")
    assert res["best_epoch"] == 2
    with pytest.raises(ValueError):
        figures.plot_curves([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


@pytest.mark.parametrize("latent_dim", [1, 2, 5])
def test_plot_latent_radius99(tmp_path, latent_dim):
    model = FakeModel(latent_dim=latent_dim)
    for n in (150, 1001):   # 150: where a linear-interpolated percentile would fail
        x, labels = make_data(n=n)
        res = figures.plot_latent(model, x, tmp_path / f"l{n}.png", labels=labels)
        mu = model.encode(x)[0].astype(np.float64)
        if latent_dim == 1:
            pts = np.abs(mu[:, 0])
        elif latent_dim == 2:
            pts = np.linalg.norm(mu, axis=1)
        else:
            c = mu - mu.mean(axis=0)
            vt = np.linalg.svd(c, full_matrices=False)[2][:2]
            pts = np.linalg.norm(mu @ vt.T, axis=1)  # uncentred projection, sign-free norm
        r = res["radius99"]
        assert np.isclose(r, np.sort(pts)[int(np.ceil(0.99 * n)) - 1], rtol=1e-5)
        inside = np.mean(pts <= r + 1e-9)
        assert inside >= 0.99
        assert np.mean(pts < r - 1e-6 * max(r, 1)) < 0.99 + 1.0 / n  # smallest such radius
        assert res["projection"] == ("pca" if latent_dim > 2 else "identity")
        assert res["n_points"] == n
        assert_png(tmp_path / f"l{n}.png")
    assert 0 < res["explained_variance"] <= 1


def test_plot_latent_without_labels_and_bad_labels(tmp_path):
    model = FakeModel(latent_dim=2, ae=True)
    x, labels = make_data(n=60)
    figures.plot_latent(model, x, tmp_path / "l.png")
    assert_png(tmp_path / "l.png")
    with pytest.raises(ValueError):
        figures.plot_latent(model, x, tmp_path / "bad.png", labels=labels[:10])


def test_plot_manifold_picks_most_active_dims(tmp_path):
    model = FakeModel(latent_dim=5, scales=[1.0, 10.0, 0.5, 30.0, 2.0])
    x, _ = make_data(n=400)
    res = figures.plot_manifold(model, tmp_path / "m.png", x_test=x, n=8)
    assert res["dims"] == [3, 1]
    act = np.asarray(res["activity"])
    assert np.argsort(-act)[:2].tolist() == [3, 1]
    assert_png(tmp_path / "m.png")
    # the decoded lattice varies only dims 3 and 1; all others are held at 0
    zs = []
    orig = model.decode
    model.decode = lambda z: (zs.append(np.array(z)), orig(z))[1]
    figures.plot_manifold(model, tmp_path / "m2.png", x_test=x, n=4)
    z = np.concatenate(zs)
    assert z.shape == (16, 5)
    assert np.all(z[:, [0, 2, 4]] == 0)
    assert len(np.unique(z[:, 3])) == 4 and len(np.unique(z[:, 1])) == 4
    with pytest.raises(ValueError):
        figures.plot_manifold(model, tmp_path / "m3.png")  # 5-D needs x_test


def test_plot_manifold_2d_quantile_lattice(tmp_path):
    model = FakeModel(latent_dim=2)
    res = figures.plot_manifold(model, tmp_path / "m.png", n=20)
    assert res["dims"] == [0, 1] and res["activity"] is None
    q = np.asarray(res["quantiles"])
    assert q.shape == (20,)
    assert np.isclose(q[0], -1.6448536, atol=1e-6) and np.isclose(q[-1], 1.6448536, atol=1e-6)
    assert np.allclose(q, -q[::-1])
    assert_png(tmp_path / "m.png", min_h=300, min_w=300)


def test_plot_interpolation(tmp_path):
    model = FakeModel(latent_dim=5)
    x, labels = make_data(n=200)
    res = figures.plot_interpolation(model, x, tmp_path / "i.png", np.random.default_rng(3),
                                     labels=labels, n_pairs=4, steps=7)
    assert res["n_pairs"] == 4 and res["steps"] == 7
    pairs = np.asarray(res["pairs"])
    assert pairs.shape == (4, 2) and len(np.unique(pairs)) == 8
    att = res["attribute"]
    assert att["from_class"] != att["to_class"]
    assert all(labels[i] == att["from_class"] for i in att["indices"])
    assert att["vector_norm"] > 0
    assert_png(tmp_path / "i.png")
    res2 = figures.plot_interpolation(model, x, tmp_path / "i2.png", np.random.default_rng(3),
                                      labels=labels, classes=(7, 1))
    assert (res2["attribute"]["to_class"], res2["attribute"]["from_class"]) == (7, 1)


# --------------------------------------------------------------------------- atomic writes

def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, fh, **kw):
        fh.write(b"half a png")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        figures.plot_curves(HISTORY, tmp_path / "c.png")
    assert os.listdir(tmp_path) == []


def test_overwrite_is_atomic_and_clean(tmp_path):
    target = tmp_path / "c.png"
    target.write_bytes(b"old")
    figures.plot_curves(HISTORY, target)
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert no_temp_files(tmp_path) == []


# --------------------------------------------------------------------------- what the figures show

def test_reconstructions_show_every_class_of_a_sorted_split(tmp_path):
    model = FakeModel(input_shape=(1, 8, 8))
    x, labels = make_data(n=400)
    order = np.argsort(labels, kind="stable")        # MNIST's test split is ordered by class
    x, labels = x[order], labels[order]
    res = figures.plot_reconstructions(model, x, tmp_path / "r.png", n=16)
    shown = labels[np.asarray(res["indices"])]
    assert set(shown) == set(labels), shown           # the first 16 would all be 0s


def test_attribute_rows_end_in_the_target_decoding_not_a_blank_tile(tmp_path, monkeypatch):
    grids = []
    real_grid = figures.image_grid

    def capture(images, ncols, *args, **kw):
        grids.append((np.asarray(images), ncols))
        return real_grid(images, ncols, *args, **kw)

    monkeypatch.setattr(figures, "image_grid", capture)
    model = FakeModel(latent_dim=4)
    x, labels = make_data(n=200)
    figures.plot_interpolation(model, x, tmp_path / "i.png", np.random.default_rng(3), labels=labels,
                               steps=5, n_attribute=3)
    images, ncols = grids[-1]                         # the attribute block
    last_tiles = images.reshape(3, ncols, -1)[:, -1]
    assert not np.allclose(last_tiles, 0.5), "a blank grey tile ends the attribute rows"
    assert np.allclose(last_tiles, last_tiles[0])     # the same target, decode(mean mu[a]), on every row


def test_autoencoder_curves_say_reconstruction_loss_not_elbo(tmp_path, monkeypatch):
    titles = []
    real_set_title = matplotlib.axes.Axes.set_title

    def record(self, label, *args, **kw):
        titles.append(label)
        return real_set_title(self, label, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", record)
    ae = [{"epoch": e, "train_loss": 90.0 / e, "test_loss": 95.0 / e, "train_recon": 90.0 / e,
           "test_recon": 95.0 / e, "train_kl": 0.0, "test_kl": 0.0} for e in (1, 2)]   # as the trainer records an AE
    figures.plot_curves(ae, tmp_path / "ae.png")
    assert not any("ELBO" in t for t in titles), titles
    titles.clear()
    figures.plot_curves(HISTORY, tmp_path / "vae.png")
    assert "Negative ELBO" in titles


ANALYSIS_WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None          # as if matplotlib were not installed
import numpy as np
from scratchvae import analysis
from scratchvae.models import mlp_vae
model = mlp_vae(input_dim=16, hidden=(8,), latent_dim=3, input_shape=(1, 4, 4), fused=False, dtype="float64")
x = (np.random.default_rng(0).random((40, 16)) < 0.5).astype(np.float64)
labels = np.arange(40) % 4
view = analysis.latent_projection(model, x, labels)
assert view["kind"] == "pca" and view["xs"].shape == (40,)
assert np.isclose((view["norms"] <= view["radius99"]).mean(), 1.0)
lattice = analysis.manifold_lattice(model, x, n=5)
assert lattice["z"].shape == (25, 3) and lattice["images"].shape == (25, 16)
paths = analysis.interpolation_paths(model, x, np.random.default_rng(1), labels, n_pairs=3, steps=4)
assert paths["rows"].shape == (3, 6, 16) and paths["attribute"]["rows"].shape[1:] == (6, 16)
print("ok", "matplotlib" not in [m for m in sys.modules if sys.modules[m] is not None])
"""


def test_what_the_figures_show_is_computed_without_matplotlib():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", ANALYSIS_WITHOUT_MATPLOTLIB], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok True"


def test_the_posterior_shows_the_epoch_whose_parameters_the_figures_use(tmp_path):
    """A --keep-best run draws its figures with the best epoch's parameters: posterior.png shows that epoch's
    activity, not the last one's (one level and a hierarchy)."""
    one = [{"epoch": e, "kl_per_dim": [1.0, 0.5, 0.0], "latent_activity": act, "active_units": n}
           for e, act, n in ((1, [1.0, 1.0, 1.0], 3), (2, [1.0, 1.0, 0.0], 2), (3, [1.0, 0.0, 0.0], 1))]
    two = [{"epoch": e, "latent_activity": [act, act], "active_units": [n, n]}
           for e, act, n in ((1, [1.0, 1.0, 1.0], 3), (2, [1.0, 1.0, 0.0], 2), (3, [1.0, 0.0, 0.0], 1))]
    assert figures.plot_posterior(one, tmp_path / "a.png")["active_units"] == 1                # the last by default
    assert figures.plot_posterior(one, tmp_path / "b.png", epoch=2)["active_units"] == 2
    assert figures.plot_posterior(two, tmp_path / "c.png", epoch=2)["active_units"] == [2, 2]
    assert figures.plot_posterior(two, tmp_path / "d.png", epoch=1)["collapsed"] == [[], []]
