#!/usr/bin/env python
"""Quality check: the same VAE recipe trained by scratchvae and by PyTorch.

Recipe: 784-400-20 ReLU MLP VAE, Bernoulli likelihood, batch 128, Adam(lr 1e-3),
static binarized MNIST (the 50,000 training images shipped with scratchvae),
float32.  Both sides start from the SAME weights (the PyTorch twin copies
scratchvae's init) and see the SAME batches and the SAME noise eps: the
data stream is exactly the one of ``scratchvae.train.train`` (one host NumPy
generator seeded with ``--seed``: a permutation per epoch, then one
``standard_normal((B, 20))`` per step), consumed step by step by both sides.

After every epoch (and before the first), each side's test negative ELBO is
measured on the full 10,000-image test set with a single sample of eps per
image, drawn ONCE from a fixed seed and shared by both sides (so the two
numbers differ only through the weights).  The report gives both curves and
the final difference; the target is agreement within 0.5 nats.

    python benchmarks/compare_torch.py                 # 10 epochs (a few minutes on 2 cores)
    python benchmarks/compare_torch.py --epochs 3
    python benchmarks/compare_torch.py --no-torch      # scratchvae side only

``--threads`` defaults to 1 here (unlike the timing scripts): the figures do not
depend on it, single-threaded BLAS is deterministic, and a busy machine
hurts multi-threaded BLAS badly.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

TARGET_NATS = 0.5


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (tests)")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (tests)")
    C.add_common_args(p, default_json_name="compare_torch")
    p.set_defaults(threads=1)
    return p


def scratch_test_nelbo(model, x_test, eps_test, chunk=1000):
    """-mean ELBO over the test set, with the given eps (no gradients)."""
    import numpy as np
    total = 0.0
    for s in range(0, x_test.shape[0], chunk):
        total += float(np.sum(model.elbo(x_test[s:s + chunk], eps=eps_test[s:s + chunk])))
    return -total / x_test.shape[0]


def torch_test_nelbo(torch, net, x_test, eps_test, chunk=1000):
    total = 0.0
    with torch.no_grad():
        for s in range(0, x_test.shape[0], chunk):
            recon, kl = net.terms(torch.from_numpy(x_test[s:s + chunk]), torch.from_numpy(eps_test[s:s + chunk]))
            total += float((recon + kl).double().sum())
    return total / x_test.shape[0]


def main(argv=None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")
    env_note = C.preset_thread_env(args.threads)
    torch, torch_reason = C.import_torch(args.no_torch)
    import numpy as np

    from scratchvae.models import mlp_vae
    from scratchvae.optim import Adam

    X = C.mnist("train")
    x_test = C.mnist("test")
    if args.limit:
        X = X[:args.limit]
    if args.test_limit:
        x_test = x_test[:args.test_limit]
    X = np.ascontiguousarray(X, dtype=np.float32)
    x_test = np.ascontiguousarray(x_test, dtype=np.float32)
    L, B, n = args.latent_dim, args.batch_size, X.shape[0]
    eps_test = np.random.default_rng(args.seed + 1_000_003).standard_normal((x_test.shape[0], L), dtype=np.float32)

    report = {"script": "compare_torch", "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "argv": list(argv) if argv is not None else sys.argv[1:], "machine": C.machine_info(),
              "versions": C.versions(torch),
              "config": {"epochs": args.epochs, "batch_size": B, "lr": args.lr, "hidden": args.hidden,
                         "latent_dim": L, "likelihood": "bernoulli", "dataset": "binarized-mnist (static)",
                         "train_images": n, "test_images": int(x_test.shape[0]), "seed": args.seed,
                         "dtype": "float32", "thread_env": env_note,
                         "eval": "single-sample negative ELBO, eps fixed (seed + 1000003), shared by both sides"},
              "torch": {"available": torch is not None, "reason": torch_reason},
              "load_average": {"start": C.load_average()}, "target_nats": TARGET_NATS, "epochs": []}
    if torch is None:
        log(f"PyTorch: {torch_reason}; training the scratchvae side only")

    t_start = time.perf_counter()
    with C.thread_limits(args.threads, torch) as tinfo:
        report["threads"] = tinfo
        model = mlp_vae(784, hidden=(args.hidden,), latent_dim=L, seed=args.seed)
        opt = Adam(lr=args.lr)
        state = opt.init(model.params)
        net = topt = None
        if torch is not None:
            net = C.torch_twin(torch, model)
            topt = torch.optim.Adam(net.parameters(), lr=args.lr)

        def evaluate(epoch, train_s=None, train_t=None, secs=None):
            rec = {"epoch": epoch, "scratchvae_test_nelbo": scratch_test_nelbo(model, x_test, eps_test)}
            if net is not None:
                rec["torch_test_nelbo"] = torch_test_nelbo(torch, net, x_test, eps_test)
                rec["difference"] = rec["scratchvae_test_nelbo"] - rec["torch_test_nelbo"]
            if train_s is not None:
                rec["scratchvae_train_loss"] = train_s
                rec["torch_train_loss"] = train_t
                rec["seconds"] = secs
            report["epochs"].append(rec)
            line = f"epoch {epoch:3d}  test -ELBO scratchvae {rec['scratchvae_test_nelbo']:8.3f}"
            if net is not None:
                line += f"  torch {rec['torch_test_nelbo']:8.3f}  diff {rec['difference']:+.3f}"
            if secs is not None:
                line += f"  ({secs['scratchvae']:.1f} s / {secs.get('torch', 0):.1f} s)"
            log(line)

        evaluate(0)
        rng = np.random.default_rng(args.seed)          # the stream of scratchvae.train.train
        steps_per_epoch = math.ceil(n / B)
        for epoch in range(1, args.epochs + 1):
            perm = rng.permutation(n)
            sums = {"scratchvae": 0.0, "torch": 0.0}
            secs = {"scratchvae": 0.0, "torch": 0.0}
            for b in range(steps_per_epoch):
                idx = perm[b * B:(b + 1) * B]
                xb = X[idx]
                eps = rng.standard_normal((xb.shape[0], L)).astype(np.float32)
                t0 = time.perf_counter()
                model.zero_grad()
                loss, _ = model.loss_and_grad(xb, eps=eps, check_data=False)
                state = opt.step(model.params, model.grads, state)
                t1 = time.perf_counter()
                secs["scratchvae"] += t1 - t0
                sums["scratchvae"] += loss
                if net is not None:
                    xt, et = torch.from_numpy(xb), torch.from_numpy(eps)
                    t0 = time.perf_counter()
                    topt.zero_grad(set_to_none=True)
                    tl = net.loss(xt, et)
                    tl.backward()
                    topt.step()
                    t1 = time.perf_counter()
                    secs["torch"] += t1 - t0
                    sums["torch"] += float(tl.item())
            evaluate(epoch, sums["scratchvae"] / steps_per_epoch,
                     sums["torch"] / steps_per_epoch if net is not None else None, secs)

    final = report["epochs"][-1]
    report["final"] = {k: final.get(k) for k in ("scratchvae_test_nelbo", "torch_test_nelbo", "difference")}
    if "difference" in final:
        report["final"]["abs_difference"] = abs(final["difference"])
        report["final"]["within_target"] = abs(final["difference"]) <= TARGET_NATS
    report["load_average"]["end"] = C.load_average()
    report["seconds"] = time.perf_counter() - t_start
    out = C.write_json(args.json or C.default_json_path("compare_torch"), report)
    if "difference" in final:
        log(f"final test -ELBO: scratchvae {final['scratchvae_test_nelbo']:.3f}, torch {final['torch_test_nelbo']:.3f}, "
            f"difference {final['difference']:+.3f} nats (target |diff| <= {TARGET_NATS}: "
            f"{'met' if report['final']['within_target'] else 'MISSED'})")
    log(f"load average start {report['load_average']['start']} end {report['load_average']['end']}; "
        f"{report['seconds']:.0f} s; JSON: {out}")
    report["json_path"] = str(out)
    return report


if __name__ == "__main__":
    main()
