"""Train the VampPrior authors' own two-level HVAE on the shipped data: the reference run of the
paper table in docs/hierarchy.md.

    git clone https://github.com/jmtomczak/vae_vampprior /path/to/vae_vampprior
    python benchmarks/authors_reference.py --authors-repo /path/to/vae_vampprior --check
    python benchmarks/authors_reference.py --authors-repo /path/to/vae_vampprior --out runs/authors-hvae

Needs PyTorch (CPU). The model and its loss are the authors' module, imported unmodified
(``models/HVAE_2level.py``: gated 300-wide layers, z1 = z2 = 40, the VampPrior of 500 pseudo-inputs on
z2, their He initialization and pseudo-input initialization N(0.05, 0.01)). Their training code calls
PyTorch APIs removed since 0.3, so the loop and the optimizer are rewritten here from
``utils/training.py``, ``utils/perform_experiment.py`` and ``utils/optimizer.py``: AdamNormGrad (Adam
on each gradient divided by its L2 norm), lr 5e-4, batches of 100 reshuffled every epoch, beta =
min(epoch / 100, 1), early stopping on the one-sample validation ELBO with patience 50, the count reset
during the warm-up, at most 2,000 epochs, ``torch.manual_seed(14)``.

``--check`` gives scratchvae's ``hierarchical_vae`` and the authors' module the same parameters and the
same noise in float64 and compares the loss and every gradient (run it first). The run keeps
``checkpoint.pt`` (written atomically after every epoch; run the same command again to continue) and
``best.pt``; at the end, the best epoch's parameters go into scratchvae's model and the test NLL is
scratchvae's IWAE bound (``--iwae-k``, 5000 as the paper), written to ``summary.json``.
``--likelihood-of RUN`` gives a scratchvae run's best parameters to both codes and compares the
authors' ``calculate_likelihood`` with scratchvae's ``iwae_bound`` on ``--images`` test images.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import pathlib
import sys
import time
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402

# the authors' module's part -> scratchvae's part, and the factor from scratchvae's weights to theirs
# (their heads give log variances, scratchvae's log sigmas: 2x; every Linear stores W transposed)
GATED = {"q_z2_layers.0": "encoder.0", "q_z2_layers.1": "encoder.1", "q_z1_layers_x.0": "q1.x.0",
         "q_z1_layers_z2.0": "q1.z.0", "q_z1_layers_joint.0": "q1.joint.0", "p_z1_layers.0": "p1.net.0",
         "p_z1_layers.1": "p1.net.1", "p_x_layers_z1.0": "decoder.z1.0", "p_x_layers_z2.0": "decoder.z2.0",
         "p_x_layers_joint.0": "decoder.0"}
LINEAR = {"q_z2_mean": ("mu", 1.0), "q_z2_logvar.linear": ("log_sigma.0", 2.0), "q_z1_mean": ("q1.mu", 1.0),
          "q_z1_logvar.linear": ("q1.log_sigma.0", 2.0), "p_z1_mean": ("p1.mu", 1.0),
          "p_z1_logvar.linear": ("p1.log_sigma.0", 2.0), "p_x_mean.linear": ("decoder.1", 1.0)}


def import_authors(repo: pathlib.Path):
    """The authors' ``HVAE_2level`` module. Their imports name ``scipy.misc.logsumexp`` (gone from SciPy)
    and a matplotlib histogram (an argument gone from matplotlib): both are replaced, neither is used here."""
    import numba  # noqa: F401  (Numba reads SciPy's version on import: before the stand-in below exists)
    if "scipy.misc" not in sys.modules:
        misc = types.ModuleType("scipy.misc")
        misc.logsumexp = lambda a: float(np.max(a) + np.log(np.exp(np.asarray(a) - np.max(a)).sum()))
        sys.modules.setdefault("scipy", types.ModuleType("scipy")).misc = misc
        sys.modules["scipy.misc"] = misc
    sys.path[:0] = [str(repo), str(repo / "models")]
    import HVAE_2level
    HVAE_2level.plot_histogram = lambda *a, **k: None
    return HVAE_2level


def authors_args(seed=14):
    """Their experiment.py defaults for ``--model_name hvae_2level --prior vampprior`` on static MNIST."""
    return types.SimpleNamespace(input_size=[1, 28, 28], z1_size=40, z2_size=40, prior="vampprior",
                                 number_components=500, input_type="binary", cuda=False,
                                 use_training_data_init=0, pseudoinputs_mean=0.05, pseudoinputs_std=0.01,
                                 batch_size=100, test_batch_size=100, lr=5e-4, warmup=100,
                                 early_stopping_epochs=50, epochs=2000, seed=seed)


def scratch_model(dtype):
    from scratchvae.models import hierarchical_vae
    return hierarchical_vae(784, hidden=(300, 300), latent_dim=40, levels=2, prior="vampprior",
                            pseudo_inputs=500, dtype=dtype, init="he")


def _modules(net):
    mods = dict(net.named_modules())
    for theirs, ours in GATED.items():
        for lin, w, b in ((mods[theirs].h, "W", "b"), (mods[theirs].g, "V", "c")):
            yield lin, f"{ours}.{w}", f"{ours}.{b}", 1.0
    for theirs, (ours, scale) in LINEAR.items():
        yield mods[theirs], f"{ours}.W", f"{ours}.b", scale


def scratch_to_authors(torch, params: dict, net):
    with torch.no_grad():
        for lin, w, b, scale in _modules(net):
            lin.weight.copy_(torch.from_numpy(scale * np.asarray(params[w])).T)
            lin.bias.copy_(torch.from_numpy(scale * np.asarray(params[b])))
        net.means.linear.weight.copy_(torch.from_numpy(np.asarray(params["prior.pseudo"])).T)


def authors_to_scratch(net, model):
    for lin, w, b, scale in _modules(net):
        model.params[w][...] = lin.weight.detach().numpy().T / scale
        model.params[b][...] = lin.bias.detach().numpy() / scale
    model.params["prior.pseudo"][...] = net.means.linear.weight.detach().numpy().T


def authors_grads(net) -> dict:
    out = {}
    for lin, w, b, scale in _modules(net):
        out[w], out[b] = lin.weight.grad.numpy().T * scale, lin.bias.grad.numpy() * scale
    out["prior.pseudo"] = net.means.linear.weight.grad.numpy().T
    return out


def authors_net64(A):
    """The authors' module in float64 (their pseudo-inputs' one-hot idle input too)."""
    net = A.VAE(authors_args()).double()
    net.idle_input = net.idle_input.double()
    return net


def check(torch, A, log=print) -> float:
    """Same parameters, same noise, float64: the authors' loss and gradients against scratchvae's."""
    torch.set_default_dtype(torch.float64)
    model = scratch_model("float64")
    gen = np.random.default_rng(1)
    model.params["prior.pseudo"][...] = gen.uniform(0.1, 0.9, model.params["prior.pseudo"].shape)   # off the clamp
    x = (gen.random((64, 784)) < 0.3).astype(np.float64)
    eps = gen.standard_normal(model.noise_shape(64))           # (B, S = 1, T = 2, Z)
    net = authors_net64(A)
    scratch_to_authors(torch, model.params, net)
    queue = [eps[:, 0, 1], eps[:, 0, 0]]                         # their forward draws z2 first, then z1
    net.reparameterize = lambda mu, logvar: torch.from_numpy(queue.pop(0)) * torch.exp(0.5 * logvar) + mu
    loss, _, _ = net.calculate_loss(torch.from_numpy(x), beta=0.7, average=True)
    loss.backward()
    model.zero_grad()
    ours = model.loss_and_grad(x, eps=eps, beta=0.7)
    ours = float(ours[0] if isinstance(ours, tuple) else ours)
    theirs, worst = authors_grads(net), abs(loss.item() - ours) / abs(ours)
    for name, g in theirs.items():
        worst = max(worst, float(np.abs(g - model.grads[name]).max() / np.abs(model.grads[name]).max()))
    log(f"float64, beta 0.7, 64 images: loss {loss.item():.12f} (authors) {ours:.12f} (scratchvae); "
        f"{len(theirs)} of {len(model.grads)} gradients; largest relative difference {worst:.2e}")
    torch.set_default_dtype(torch.float32)
    return worst


def compare_likelihood(torch, A, run: pathlib.Path, n: int, k: int, log=print) -> dict:
    """A trained run's best parameters in both codes, float64: the authors' ``calculate_likelihood``
    (S = k samples per image, in chunks of 500) and scratchvae's ``iwae_bound`` (two draws of noise) on
    ``n`` test images drawn at random; per image, the codes differ by about as much as two draws."""
    from scratchvae.build import build_model
    from scratchvae.reload import load_trained

    torch.set_default_dtype(torch.float64)
    model32, data, cfg, _, _ = load_trained(run, params="best")
    model = build_model(dataclasses.replace(cfg, dtype="float64"), data.image_shape, model32.backend)
    for name in model.params:
        model.params[name][...] = np.asarray(model32.params[name], dtype=np.float64)
    x = np.asarray(data.test[np.random.default_rng(7).choice(data.test.shape[0], n, replace=False)], np.float64)
    net = authors_net64(A)
    scratch_to_authors(torch, model.params, net)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):                    # it prints its progress per image
        theirs = np.array([net.calculate_likelihood(torch.from_numpy(x[j:j + 1]), "", S=k, MB=500)
                           for j in range(n)])
    t1 = time.perf_counter()
    ours = np.stack([-model.iwae_bound(x, k, np.random.default_rng(11 + r)) for r in range(2)])   # (2, n)
    rms = {"authors_vs_draw_0": float(np.sqrt(np.mean((theirs - ours[0]) ** 2))),
           "draw_1_vs_draw_0": float(np.sqrt(np.mean((ours[1] - ours[0]) ** 2)))}
    log(f"{n} test images, k = {k}, float64: the authors' calculate_likelihood {theirs.mean():.3f} nats "
        f"({t1 - t0:.0f} s); scratchvae's iwae_bound {ours[0].mean():.3f} and {ours[1].mean():.3f} (two draws, "
        f"{time.perf_counter() - t1:.0f} s); per image, rms difference {rms['authors_vs_draw_0']:.2f} "
        f"(authors - draw 0) and {rms['draw_1_vs_draw_0']:.2f} (draw 1 - draw 0)")
    torch.set_default_dtype(torch.float32)
    return {"run": str(run), "images": n, "k": k, "authors": theirs.tolist(), "scratchvae": ours.tolist(),
            "rms": rms, "machine": _common.machine_info(), "versions": _common.versions(torch),
            "date": time.strftime("%Y-%m-%d")}


class AdamNormGrad:
    """The authors' optimizer: Adam on g / (||g||_2 + 1e-7), each parameter's gradient normalized alone."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [p.detach().new_zeros(p.shape) for p in self.params]
        self.v = [p.detach().new_zeros(p.shape) for p in self.params]

    def step(self):
        b1, b2 = self.betas
        self.t += 1
        # step = lr sqrt(1 - b2^t) / (1 - b1^t)
        step = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad / (p.grad.norm(2) + 1e-7)
            m.mul_(b1).add_(g, alpha=1 - b1)                  # m = b1 m + (1 - b1) g
            v.mul_(b2).addcmul_(g, g, value=1 - b2)           # v = b2 v + (1 - b2) g^2
            p.data.addcdiv_(m, v.sqrt().add_(self.eps), value=-step)   # p -= step m / (sqrt(v) + eps)

    def state(self):
        return {"t": self.t, "m": self.m, "v": self.v}

    def load(self, state):
        self.t = state["t"]
        for dst, src in zip(self.m + self.v, state["m"] + state["v"]):
            dst.copy_(src)


def save_atomic(torch, obj, path: pathlib.Path):
    from scratchvae.atomic import atomic_write
    with atomic_write(path) as f:
        torch.save(obj, f)


def train(torch, A, out: pathlib.Path, iwae_k: int, log=print) -> dict:
    from scratchvae import datasets
    from scratchvae.evaluation import iwae_test_nll

    args = authors_args()
    data = datasets.load("binarized-mnist")
    x_train, x_valid = torch.from_numpy(data.train), torch.from_numpy(data.valid)
    torch.manual_seed(args.seed)
    net = A.VAE(args)
    opt = AdamNormGrad(net.parameters(), lr=args.lr)
    state = {"epoch": 0, "best_loss": 100000.0, "best_epoch": 0, "e": 0}
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log(f"continuing after epoch {state['epoch']} (best {state['best_loss']:.3f} at {state['best_epoch']})")
    N, B = x_train.shape[0], args.batch_size
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        if state["e"] > args.early_stopping_epochs:
            break
        t0 = time.perf_counter()
        beta = min(1.0 * epoch / args.warmup, 1.0)
        net.train()
        sums = np.zeros(3)
        order = torch.randperm(N)                              # the DataLoader's shuffle=True
        for s in range(0, N, B):
            net.zero_grad(set_to_none=True)
            loss, re, kl = net.calculate_loss(x_train[order[s:s + B]], beta, average=True)
            loss.backward()
            opt.step()
            sums += (loss.item(), -re.item(), kl.item())
        train_loss, train_re, train_kl = sums / math.ceil(N / B)
        net.eval()
        with torch.no_grad():                                  # their evaluate_vae: batches of 100, beta = 1
            val = np.mean([[t.item() for t in net.calculate_loss(x_valid[s:s + 100], average=True)]
                           for s in range(0, x_valid.shape[0], 100)], axis=0)
        val_loss = float(val[0])
        if val_loss < state["best_loss"]:                      # their early stopping, line for line
            state.update(e=0, best_loss=val_loss, best_epoch=epoch)
            save_atomic(torch, net.state_dict(), out / "best.pt")
        else:
            state["e"] += 1
            if epoch < args.warmup:
                state["e"] = 0
        state["epoch"] = epoch
        row = {"epoch": epoch, "beta": beta, "train_loss": float(train_loss), "train_re": float(train_re),
               "train_kl": float(train_kl), "valid_loss": val_loss, "valid_re": float(-val[1]),
               "valid_kl": float(val[2]), "seconds": time.perf_counter() - t0}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        save_atomic(torch, {"model": net.state_dict(), "optimizer": opt.state(), "torch_rng": torch.get_rng_state(),
                            "state": state}, ckpt)
        log(f"epoch {epoch}  beta {beta:.2f}  train {train_loss:.3f}  valid {val_loss:.3f}"
            f"{'*' if state['best_epoch'] == epoch else ' '}  early stop {state['e']}/{args.early_stopping_epochs}"
            f"  {row['seconds']:.1f} s")
        if math.isnan(val_loss):
            break
    net.load_state_dict(torch.load(out / "best.pt"))
    model = scratch_model("float32")
    authors_to_scratch(net, model)
    t0 = time.perf_counter()
    nll = iwae_test_nll(model, model.backend.asarray(data.test), iwae_k, np.random.default_rng(0), progress=False,
                        log=log)
    elbo = -float(np.mean(model.elbo(model.backend.asarray(data.test), rng=np.random.default_rng(1))))
    summary = {"what": "the authors' HVAE_2level module (VampPrior, K = 500), trained by benchmarks/"
                       "authors_reference.py, evaluated by scratchvae", "epochs_run": state["epoch"],
               "best_epoch": state["best_epoch"], "best_valid_loss": state["best_loss"],
               "test_nll": nll, "iwae_k": iwae_k, "test_elbo_loss": elbo, "eval_seconds": time.perf_counter() - t0,
               "machine": _common.machine_info(), "versions": _common.versions(torch),
               "date": time.strftime("%Y-%m-%d")}
    _common.write_json(out / "summary.json", summary)
    log(f"best epoch {state['best_epoch']} of {state['epoch']}: test NLL {nll:.3f} (k = {iwae_k})")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--authors-repo", type=pathlib.Path, required=True, help="a clone of jmtomczak/vae_vampprior")
    p.add_argument("--out", type=pathlib.Path, help="the run folder (run again to continue)")
    p.add_argument("--check", action="store_true", help="compare the loss and gradients in float64 and exit")
    p.add_argument("--likelihood-of", type=pathlib.Path, metavar="RUN",
                   help="compare the two codes' k-sample likelihood of a trained run folder's best parameters and exit")
    p.add_argument("--images", type=int, default=20, help="test images for --likelihood-of (default 20)")
    p.add_argument("--json", type=pathlib.Path, help="where --likelihood-of writes its figures")
    p.add_argument("--iwae-k", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if not (a.authors_repo / "models" / "HVAE_2level.py").is_file():
        p.error(f"--authors-repo {a.authors_repo}: no models/HVAE_2level.py there")
    torch, why = _common.import_torch()
    if torch is None:
        p.error(f"PyTorch: {why}")
    if not (a.check or a.likelihood_of) and a.out is None:
        p.error("--out: give the run folder (or --check, or --likelihood-of)")
    A = import_authors(a.authors_repo)
    with _common.thread_limits(a.threads, torch):
        if a.check:
            return 0 if check(torch, A) < 1e-9 else 1
        if a.likelihood_of:
            result = compare_likelihood(torch, A, a.likelihood_of, a.images, a.iwae_k)
            if a.json:
                _common.write_json(a.json, result)
            return 0
        a.out.mkdir(parents=True, exist_ok=True)
        train(torch, A, a.out, a.iwae_k, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
