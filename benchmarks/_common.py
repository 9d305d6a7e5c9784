"""Shared plumbing of the benchmark scripts (not part of the scratchvae package).

* thread control: ``--threads N`` sets NumPy's BLAS (through threadpoolctl,
  or the ``*_NUM_THREADS`` environment variables when threadpoolctl is
  missing and NumPy is not imported yet) and PyTorch (``torch.set_num_threads``);
* machine / version / load-average records for the JSON reports;
* the PyTorch twins of ``mlp_vae`` / ``conv_vae`` with the weights copied
  from a scratchvae model, and the same loss;
* the alternating timer: ``alternate(sides, rounds)`` runs one block of
  steps of every side per round and keeps every per-round figure.

PyTorch is optional everywhere: :func:`import_torch` returns ``(None, reason)``
when it is missing or disabled, and the scripts then report NumPy figures only.
Nothing here is imported by the library, and torch is never a dependency of it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import platform
import socket
import statistics
import sys
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


# -- threads ----------------------------------------------------------------------------

def preset_thread_env(threads: int) -> str:
    """Set the BLAS/OpenMP thread variables, when NumPy is not imported yet.

    Called by the scripts before they import NumPy, so that a machine
    without threadpoolctl still gets the requested count.  Returns a short
    description of what happened.
    """
    if "numpy" in sys.modules:
        return "env not set (numpy already imported)"
    for name in _THREAD_ENV:
        os.environ[name] = str(int(threads))
    return f"env {'/'.join(_THREAD_ENV[:3])}={int(threads)}"


@contextlib.contextmanager
def thread_limits(threads: int, torch=None):
    """Pin NumPy's BLAS (and PyTorch) to ``threads`` threads for the block.

    Yields a dict describing the effective setting (recorded in the JSON).
    """
    info = {"requested": int(threads), "numpy_blas": None, "method": None, "torch": None}
    stack = contextlib.ExitStack()
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    with stack:
        if threadpoolctl is not None:
            stack.enter_context(threadpoolctl.threadpool_limits(limits=int(threads), user_api="blas"))
            info["method"] = "threadpoolctl"
            info["blas_libraries"] = [
                {k: d.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture",
                                       "filepath")}
                for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
            nums = [d["num_threads"] for d in info["blas_libraries"] if "openblas" in str(d["filepath"]).lower()
                    or "numpy" in str(d["filepath"]).lower()]
            info["numpy_blas"] = nums[0] if nums else None
        else:
            env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
            info["method"] = f"environment (OPENBLAS_NUM_THREADS={env}); install threadpoolctl to enforce"
            info["numpy_blas"] = int(env) if env and env.isdigit() else None
        if torch is not None:
            old = torch.get_num_threads()
            torch.set_num_threads(int(threads))
            stack.callback(torch.set_num_threads, old)
            info["torch"] = torch.get_num_threads()
        yield info


# -- optional imports ----------------------------------------------------------------------

def import_torch(disabled: bool = False):
    """``(torch, None)`` or ``(None, reason)``."""
    if disabled:
        return None, "disabled (--no-torch)"
    try:
        import torch
    except ImportError as err:
        return None, f"not installed ({err}); install the CPU wheel with `pip install torch==2.13.0`"
    return torch, None


def cupy_backend(disabled: bool = False):
    """``(Backend, None)`` or ``(None, reason)`` for scratchvae's CuPy backend."""
    if disabled:
        return None, "disabled (--no-gpu)"
    from scratchvae import backend
    try:
        return backend.get("cupy"), None
    except backend.BackendUnavailable as err:
        return None, str(err).split(";")[0]
    except Exception as err:  # a broken install: report, never crash the CPU figures
        return None, f"{type(err).__name__}: {err}"


def torch_cuda(torch):
    """``(device, None)`` or ``(None, reason)``."""
    if torch is None:
        return None, "no PyTorch"
    try:
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        return None, "torch.cuda.is_available() is False"
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"


# -- records ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "amx")))
    except OSError:
        pass
    return []


def cpu_id() -> dict:
    """Vendor, family, model and stepping from /proc/cpuinfo (a VM's model name may be just "AMD EPYC")."""
    keys = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping"}
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and keys[key] not in out:
                    out[keys[key]] = value.strip()
                if not line.strip():
                    break
    except OSError:
        pass
    return out


def cpu_label(model: str, flags: list, ident: dict) -> str:
    """The CPU as a figure should name it: the model name, the AMD core generation where the family
    and flags tell it, and the widest vector ISA, e.g. "AMD EPYC Zen 4 (AVX-512)"."""
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    if "amx_tile" in flags:
        isa += ", AMX"
    family = ident.get("family", "")
    zen = {"23": "Zen 2", "25": "Zen 4" if "avx512f" in flags else "Zen 3", "26": "Zen 5"}.get(family)
    if ident.get("vendor") == "AuthenticAMD" and zen and "Zen" not in model:
        model = f"{model} {zen}"
    return f"{model} ({isa})"


def machine_info() -> dict:
    model, flags, ident = cpu_model(), cpu_flags(), cpu_id()
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_model": model, "cpu_flags": flags, "cpu_id": ident, "cpu": cpu_label(model, flags, ident),
            "cores": os.cpu_count(), "python": platform.python_version(), "scheduling": scheduling()}


def versions(torch=None) -> dict:
    out = {}
    for name in ("numpy", "numba", "cupy", "threadpoolctl", "scratchvae"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    out["torch"] = torch.__version__ if torch is not None else None
    return out


def scheduling() -> dict:
    """This process's CPU-scheduling context (nice, autogroup): it decides how loaded runs compare."""
    out = {"nice": None, "autogroup": None, "sched_autogroup_enabled": None}
    try:
        out["nice"] = os.nice(0)
    except OSError:
        pass
    for key, path in (("autogroup", "/proc/self/autogroup"),
                      ("sched_autogroup_enabled", "/proc/sys/kernel/sched_autogroup_enabled")):
        try:
            with open(path) as f:
                out[key] = f.read().strip()
        except OSError:
            pass
    return out


def load_average() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def default_json_path(script: str) -> pathlib.Path:
    return RESULTS_DIR / f"{script}-{socket.gethostname()}.json"


def write_json(path, obj) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, pathlib.Path):
        return str(o)
    return str(o)


def busy_warning(threads: int):
    """A warning string when other processes compete for the cores, else None."""
    la = load_average()
    cores = os.cpu_count() or 1
    if la is None:
        return None
    if la[0] + threads > cores + 0.5:
        group = scheduling().get("autogroup") or ""
        raised = ""
        try:
            if int(group.rsplit("nice", 1)[1]) < 0:
                raised = f" This run has a raised scheduler priority ({group}), which shields it from most of that."
        except (IndexError, ValueError):
            pass
        return (f"load average {la[0]:.2f} on {cores} cores with {threads} benchmark thread(s): other processes "
                "compete for the cores. Multi-threaded BLAS (OpenBLAS and MKL both spin-wait between "
                "products) is then far slower and noisier; figures at --threads 1 are the reliable ones. "
                "(Note: with kernel.sched_autogroup_enabled=1, `nice` on a job started from another "
                "session does not lower its share; see benchmarks/run_priority.sh.)" + raised)
    return None


# -- timing ----------------------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def calibrate(fn, target_s: float, max_steps: int = 1000) -> tuple[int, float]:
    """Steps per block so that a block of ``fn`` lasts about ``target_s``; also the one-step time."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    if one < target_s / 4:            # a second, better estimate for fast steps
        k = max(1, min(50, int(target_s / 4 / max(one, 1e-7))))
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        one = (time.perf_counter() - t0) / k
    return max(1, min(max_steps, round(target_s / max(one, 1e-9)))), one


def alternate(sides: dict, rounds: int, steps: dict, sync: dict | None = None, on_round=None) -> dict:
    """Run ``rounds`` rounds; in each, a block of ``steps[name]`` calls of every side, in dict order.

    Returns ``{name: [seconds per call, one per round]}`` plus ``"load"``: the
    1-minute load average after each round.
    """
    sync = sync or {}
    out = {name: [] for name in sides}
    out["load"] = []
    for r in range(rounds):
        for name, fn in sides.items():
            n = steps[name]
            s = sync.get(name)
            if s is not None:
                s()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if s is not None:
                s()
            out[name].append((time.perf_counter() - t0) / n)
        la = load_average()
        out["load"].append(la[0] if la else None)
        if on_round is not None:
            on_round(r, out)
    return out


def ratios(num: list, den: list) -> list:
    return [a / b for a, b in zip(num, den)]


def fmt_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_common_args(parser, *, default_json_name):
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="BLAS threads of NumPy and torch.set_num_threads (default: os.cpu_count())")
    parser.add_argument("--no-torch", action="store_true", help="do not import PyTorch (NumPy figures only)")
    parser.add_argument("--json", default=None,
                        help=f"where to write the JSON report (default benchmarks/results/{default_json_name}-<hostname>.json)")
    parser.add_argument("--seed", type=int, default=0)


# -- data ---------------------------------------------------------------------------------------

def mnist(split="train"):
    """Binarized MNIST as a float32 (N, 784) array."""
    from scratchvae import datasets
    data = datasets.load("binarized-mnist")
    return {"train": data.train, "test": data.test, "valid": data.valid}[split]


#: The image model of docs/images.md and ``bench_run.py --run celeba-conv``: the conv VAE on 64 x 64 colour.
IMAGE_SIZE = 64
IMAGE_MODEL = dict(channels=(32, 64, 128, 256), hidden=512, latent_dim=64)


def write_celeba_folder(root: pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    """``n`` generated 178 x 218 JPEGs in the CelebA layout (80% train, 10% valid, 10% test): a soft
    ellipse of one colour on a vertical gradient of two others, with a little noise; one attribute."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    yy, xx = np.mgrid[0:218, 0:178].astype(np.float32)
    attributes, partition = [], []
    for i in range(n):
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        a = top + (bottom - top) * (yy / 217)[..., None]                                   # (218, 178, 3)
        cy, cx, ry, rx = rng.uniform(80, 140), rng.uniform(60, 118), rng.uniform(30, 70), rng.uniform(25, 55)
        inside = np.exp(-((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** 2))           # (218, 178), soft edge
        a += inside[..., None] * (rng.uniform(0, 255, 3) - a)
        a += rng.normal(0.0, 6.0, a.shape)
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / "img_align_celeba" / name, quality=90)
        attributes.append(f"{name} {1 if ry * rx > 1500 else -1:2d}")
        partition.append(f"{name} {0 if i < 0.8 * n else (1 if i < 0.9 * n else 2)}")
    (root / "list_attr_celeba.txt").write_text(f"{n}\nBig\n" + "\n".join(attributes) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root


def image_data(n=300, seed=0):
    """``n`` generated CelebA-layout images decoded by scratchvae (as a run decodes them, into a
    throw-away cache), as float32 intensities x/255, (N, 3*64*64)."""
    import tempfile

    from scratchvae.datasets.images import load_celeba
    with tempfile.TemporaryDirectory() as tmp:
        root = write_celeba_folder(pathlib.Path(tmp) / "celeba", n, seed)
        data = load_celeba(root, image_size=IMAGE_SIZE, cache_dir=pathlib.Path(tmp) / "cache")
        return (data.train.astype("float32") / 255).reshape(data.train.shape[0], -1)


# -- PyTorch twins -----------------------------------------------------------------------------

GATED_MODELS = ("vampprior", "iwae", "hvae")


def gated_model(kind, backend=None, seed=0, dtype="float32"):
    """The VampPrior paper's gated 2x300 VAE (z = 40) of the benchmarks: ``vampprior`` (K = 500
    pseudo-inputs, the ELBO), ``iwae`` (the standard prior, the IWAE objective with S = 5) or ``hvae`` (the
    paper's two-level HVAE, z1 = z2 = 40, with the VampPrior of 500 pseudo-inputs on z2, the ELBO)."""
    from scratchvae.models import gated_vae, hierarchical_vae
    if kind == "hvae":
        return hierarchical_vae(784, hidden=(300, 300), latent_dim=40, levels=2, prior="vampprior",
                                pseudo_inputs=500, backend=backend, seed=seed, dtype=dtype)
    options = {"vampprior": dict(prior="vampprior", pseudo_inputs=500), "iwae": dict(objective="iwae", samples=5)}
    return gated_vae(784, hidden=(300, 300), latent_dim=40, backend=backend, seed=seed, dtype=dtype,
                     **options[kind])


def torch_twin(torch, model, device="cpu"):
    """A ``torch.nn.Module`` with the architecture, dtype and current weights of scratchvae ``model``.

    Walks the scratchvae parts (encoder, mu, log_sigma, decoder) layer by
    layer: Dense -> nn.Linear (W transposed: scratchvae stores (in, out),
    PyTorch (out, in)); Conv2d / ConvTranspose2d -> the PyTorch layers of the
    same geometry (identical weight layouts); ReLU/LeakyReLU/Tanh/Sigmoid/
    Softplus; Reshape and ToCHWB -> Unflatten; Flatten and FromCHWB ->
    Flatten (the twin is NCHW throughout: layouts do not change the math).
    """
    import numpy as np
    from torch import nn

    from scratchvae.layers import (
        Clamp,
        Conv2d,
        ConvTranspose2d,
        Dense,
        Flatten,
        FromCHWB,
        GatedDense,
        LeakyReLU,
        ReLU,
        Reshape,
        Sequential,
        Sigmoid,
        Softplus,
        Tanh,
        ToCHWB,
    )

    tdtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[np.dtype(model.dtype)]
    fk = {"dtype": tdtype, "device": device}

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(model.backend.asnumpy(a))).to(device)

    def convert(layer):
        if isinstance(layer, Sequential):
            return nn.Sequential(*[convert(child) for child in layer.layers])
        if isinstance(layer, Dense):
            lin = nn.Linear(layer.in_features, layer.out_features, **fk)
            with torch.no_grad():
                lin.weight.copy_(t(layer.params["W"]).T)
                lin.bias.copy_(t(layer.params["b"]))
            return lin
        if isinstance(layer, GatedDense):
            gated = GatedLinear(layer.in_features, layer.out_features, **fk)
            with torch.no_grad():
                for lin, w, b in ((gated.h, "W", "b"), (gated.g, "V", "c")):
                    lin.weight.copy_(t(layer.params[w]).T)
                    lin.bias.copy_(t(layer.params[b]))
            return gated
        if isinstance(layer, Clamp):
            return nn.Hardtanh(layer.low, layer.high)   # its gradient, like Clamp's, is 0 at and beyond the ends
        if isinstance(layer, Conv2d):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, **fk)
            with torch.no_grad():
                conv.weight.copy_(t(layer.params["W"]))
                conv.bias.copy_(t(layer.params["b"]))
            return conv
        if isinstance(layer, ConvTranspose2d):
            conv = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                      layer.padding, layer.output_padding, **fk)
            with torch.no_grad():
                conv.weight.copy_(t(layer.params["W"]))
                conv.bias.copy_(t(layer.params["b"]))
            return conv
        if isinstance(layer, ReLU):
            return nn.ReLU()
        if isinstance(layer, LeakyReLU):
            return nn.LeakyReLU(layer.negative_slope)
        if isinstance(layer, Tanh):
            return nn.Tanh()
        if isinstance(layer, Sigmoid):
            return nn.Sigmoid()
        if isinstance(layer, Softplus):
            return nn.Softplus()
        if isinstance(layer, (Reshape, ToCHWB)):   # PyTorch stays NCHW throughout
            return nn.Unflatten(1, layer.shape)
        if isinstance(layer, (Flatten, FromCHWB)):
            return nn.Flatten()
        raise TypeError(f"no PyTorch twin for {layer!r}")

    class GatedLinear(nn.Module):
        """h = (x W + b) * sigmoid(x V + c), as scratchvae.layers.GatedDense."""

        def __init__(self, n_in, n_out, **kw):
            super().__init__()
            self.h, self.g = nn.Linear(n_in, n_out, **kw), nn.Linear(n_in, n_out, **kw)

        def forward(self, x):
            return self.h(x) * torch.sigmoid(self.g(x))

    if model.likelihood != "bernoulli":
        raise ValueError("the PyTorch twin implements the Bernoulli likelihood only")
    prior, samples = getattr(model, "prior", None), getattr(model, "samples", 1)
    vamp = prior is not None and prior.name == "vampprior"
    log_2pi = math.log(2 * math.pi)

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = convert(model.encoder)
            self.mu = convert(model.mu_head)
            self.log_sigma = convert(model.log_sigma_head)
            self.decoder = convert(model.decoder)
            self.input_shape = model.input_shape
            if vamp:   # the VampPrior's pseudo-inputs, read as clamp(pseudo, 0, 1)
                self.pseudo = nn.Parameter(t(prior.params["pseudo"]).clone())

        def terms(self, x, eps):
            """Per-example recon NLL (B,) and KL (B,); x is flat (B, D)."""
            F = torch.nn.functional
            h = self.encoder(x)
            mu, log_sigma = self.mu(h), self.log_sigma(h)
            z = mu + torch.exp(log_sigma) * eps
            out = self.decoder(z)
            recon = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(dim=1)
            kl = (0.5 * (mu * mu + torch.exp(2 * log_sigma) - 1) - log_sigma).sum(dim=1)
            return recon, kl

        def loss(self, x, eps):
            """The loss averaged over the batch (beta = 1), as scratchvae's loss_and_grad."""
            if vamp or samples > 1:
                return self.sampled_loss(x, eps)
            F = torch.nn.functional
            B = x.shape[0]
            h = self.encoder(x)
            mu, log_sigma = self.mu(h), self.log_sigma(h)
            z = mu + torch.exp(log_sigma) * eps
            out = self.decoder(z)
            recon = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / B
            kl = (0.5 * (mu * mu + torch.exp(2 * log_sigma) - 1) - log_sigma).sum() / B
            return recon + kl

        def vamp_log_prior(self, z, mu_k, log_sigma_k):
            """log (1/K) sum_k N(z; mu_k, sigma_k^2) (N,), the (N, K) log densities as three matrix products."""
            iv = torch.exp(-2 * log_sigma_k)                                       # (K, L)
            const = -0.5 * (mu_k * mu_k * iv).sum(1) - log_sigma_k.sum(1) - 0.5 * z.shape[1] * log_2pi
            log_n = -0.5 * ((z * z) @ iv.T) + z @ (mu_k * iv).T + const           # (N, K)
            return torch.logsumexp(log_n, dim=1) - math.log(mu_k.shape[0])

        def sampled_loss(self, x, eps):
            """The sampled-KL loss: c_bs = -log p(x|z_bs) + log q(z_bs|x) - log p(z_bs); the ELBO's mean c,
            or the IWAE's -logsumexp_s(-c_bs) + log S; the VampPrior's components in the batch's encoder pass."""
            F = torch.nn.functional
            B, L = x.shape[0], eps.shape[-1]
            S = samples
            h = self.encoder(torch.cat([x, torch.clamp(self.pseudo, 0, 1)]) if vamp else x)
            mu_all, log_sigma_all = self.mu(h), self.log_sigma(h)
            mu, log_sigma = mu_all[:B], log_sigma_all[:B]
            eps3 = eps.reshape(B, S, L)
            z = (mu[:, None] + torch.exp(log_sigma)[:, None] * eps3).reshape(B * S, L)
            out = self.decoder(z)
            x_rep = x[:, None].expand(B, S, x.shape[1]).reshape(B * S, x.shape[1])
            nll = F.binary_cross_entropy_with_logits(out, x_rep, reduction="none").sum(1).reshape(B, S)
            log_q = -0.5 * (eps3 * eps3).sum(2) - log_sigma.sum(1)[:, None] - 0.5 * L * log_2pi
            if vamp:
                log_p = self.vamp_log_prior(z, mu_all[B:], log_sigma_all[B:]).reshape(B, S)
            else:
                log_p = (-0.5 * (z * z).sum(1) - 0.5 * L * log_2pi).reshape(B, S)
            c = nll + log_q - log_p                                                # (B, S)
            loss_b = c[:, 0] if S == 1 else -(torch.logsumexp(-c, dim=1) - math.log(S))
            return loss_b.mean()

    class TorchHVAE(nn.Module):
        """A VAE of several levels (scratchvae.vae): every part converted, the loss of every level in PyTorch."""

        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleDict({name.replace(".", "/"): convert(layer) for name, layer in model.parts.items()
                                        if name != "prior"})
            self.input_shape = model.input_shape
            if vamp:
                self.pseudo = nn.Parameter(t(prior.params["pseudo"]).clone())

        def part(self, name):
            return self.parts[name.replace(".", "/")]

        def heads(self, prefix, h):
            return self.part(f"{prefix}mu")(h), self.part(f"{prefix}log_sigma")(h)

        def loss(self, x, eps):
            """c = nll + sum_l log q(z_l|.) - log p(z_l|z_(l+1)); the ELBO's mean or the IWAE's bound."""
            F = torch.nn.functional
            B, S, T, Z = eps.shape
            R = B * S
            top_in = torch.cat([x, torch.clamp(self.pseudo, 0, 1)]) if vamp else x
            mu_all, ls_all = self.heads("", self.part("encoder")(top_in))
            mu, ls = mu_all[:B], ls_all[:B]
            z = {T: (mu[:, None] + torch.exp(ls)[:, None] * eps[:, :, T - 1]).reshape(R, Z)}
            log_q = -0.5 * (eps * eps).sum((2, 3)).reshape(R) - ls.sum(1).repeat_interleave(S) - 0.5 * T * Z * log_2pi
            if vamp:
                log_p = self_vamp(z[T], mu_all[B:], ls_all[B:])
            else:
                log_p = -0.5 * (z[T] * z[T]).sum(1) - 0.5 * Z * log_2pi
            for lvl in range(T - 1, 0, -1):
                hx = self.part(f"q{lvl}.x")(x).repeat_interleave(S, 0)
                h = self.part(f"q{lvl}.joint")(torch.cat([hx, self.part(f"q{lvl}.z")(z[lvl + 1])], 1))
                m_q, ls_q = self.heads(f"q{lvl}.", h)
                z[lvl] = m_q + torch.exp(ls_q) * eps[:, :, lvl - 1].reshape(R, Z)
                log_q = log_q - ls_q.sum(1)
                m_p, ls_p = self.heads(f"p{lvl}.", self.part(f"p{lvl}.net")(z[lvl + 1]))
                d = (z[lvl] - m_p) * torch.exp(-ls_p)
                log_p = log_p - 0.5 * (d * d).sum(1) - ls_p.sum(1) - 0.5 * Z * log_2pi
            h = torch.cat([self.part(f"decoder.z{lvl}")(z[lvl]) for lvl in range(1, T + 1)], 1)
            out = self.part("decoder")(h)
            nll = F.binary_cross_entropy_with_logits(out, x.repeat_interleave(S, 0), reduction="none").sum(1)
            c = (nll + log_q - log_p).reshape(B, S)
            loss_b = c[:, 0] if S == 1 else -(torch.logsumexp(-c, dim=1) - math.log(S))
            return loss_b.mean()

        def scratch_parts(self):
            return [(name, self.part(name)) for name in model.parts if name != "prior"]

    def self_vamp(z, mu_k, log_sigma_k):
        iv = torch.exp(-2 * log_sigma_k)
        const = -0.5 * (mu_k * mu_k * iv).sum(1) - log_sigma_k.sum(1) - 0.5 * z.shape[1] * log_2pi
        log_n = -0.5 * ((z * z) @ iv.T) + z @ (mu_k * iv).T + const
        return torch.logsumexp(log_n, dim=1) - math.log(mu_k.shape[0])

    net = (TorchHVAE() if getattr(model, "levels", 1) > 1 else TorchVAE()).to(device)
    return net


def torch_grads_by_scratch_name(torch, model, net):
    """{scratchvae param name: torch gradient as a NumPy array in scratchvae's layout}."""
    from torch import nn

    out = {}
    pairs = net.scratch_parts() if hasattr(net, "scratch_parts") else \
        (("encoder", net.encoder), ("mu", net.mu), ("log_sigma", net.log_sigma), ("decoder", net.decoder))
    for prefix, tpart in pairs:
        mods = list(tpart) if isinstance(tpart, nn.Sequential) else [tpart]
        seq = isinstance(tpart, nn.Sequential)
        for i, m in enumerate(mods):
            if not hasattr(m, "weight") and not hasattr(m, "g"):
                continue
            key = f"{prefix}.{i}." if seq else f"{prefix}."
            if hasattr(m, "g"):   # GatedLinear: W, b from h; V, c from the gate g
                for lin, w, b in ((m.h, "W", "b"), (m.g, "V", "c")):
                    out[key + w] = lin.weight.grad.detach().cpu().numpy().T
                    out[key + b] = lin.bias.grad.detach().cpu().numpy()
                continue
            w = m.weight.grad.detach().cpu().numpy()
            out[key + "W"] = w.T if isinstance(m, nn.Linear) else w
            out[key + "b"] = m.bias.grad.detach().cpu().numpy()
    if hasattr(net, "pseudo"):
        out["prior.pseudo"] = net.pseudo.grad.detach().cpu().numpy()
    return out
