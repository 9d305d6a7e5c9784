#!/usr/bin/env bash
# One command that proves the GPU path on a machine with an NVIDIA GPU:
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. installs the `gpu` extra if CuPy is missing;
# 2. runs the CuPy tests (backend, kernels under CuPy, the conv layers on CuPy);
# 3. trains 2 epochs with --backend cupy, and 1 + 1 epochs with a resume, and checks
#    that the two end with the same parameters;
# 4. times the default 10-epoch run with --backend cupy;
# 5. runs bench_train.py's GPU rows (CuPy against PyTorch CUDA eager, B = 128 and 1024);
# 6. scores the 10-epoch run with the IWAE bound, k = 5000, and times it;
# 7. trains the two-level VampPrior model (--levels 2) for an epoch and times its step against PyTorch CUDA.
#
# Everything goes to OUT_DIR (log.txt, summary.json and the runs); the last thing printed
# is one table. Without a usable GPU it says so and exits 0. Meant to finish in under
# 8 minutes on a current GPU.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/log.txt"
: > "$log"
say() { echo "$@" | tee -a "$log"; }
py="${PYTHON:-python}"

if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi > /dev/null 2>&1; then
    say "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); nothing to check"
    exit 0
fi
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
say "gpu_check: $gpu"

if ! "$py" -c "import cupy" > /dev/null 2>&1; then
    say "installing the gpu extra"
    "$py" -m pip install -q -e ".[gpu]" >> "$log" 2>&1 || { say "gpu_check: installing the gpu extra failed"; exit 1; }
fi
if ! "$py" -c "from scratchvae import backend; backend.get('cupy')" >> "$log" 2>&1; then
    say "gpu_check: CuPy cannot use the GPU here (see $log); nothing to check"
    exit 0
fi

status=0
step() {   # step NAME COMMAND...: run, time, record
    local name="$1"; shift
    local t0 ms rc
    t0=$(date +%s%N)
    if "$@" >> "$log" 2>&1; then rc=0; else rc=$?; status=1; fi
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf '%s\t%s\t%d.%03d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) >> "$out/steps.tsv"
    say "$name: exit $rc, $((ms / 1000)).$((ms % 1000 / 100)) s"
}
: > "$out/steps.tsv"

step "cupy tests" "$py" -m pytest -q -x tests/test_backend.py tests/test_kernels.py tests/test_conv.py -k "cupy or cuda or gpu"
rm -rf "$out/two" "$out/resumed" "$out/default"
step "2 epochs (cupy)" "$py" examples/train_mnist.py --backend cupy --epochs 2 --no-figures --out "$out/two"
step "1 epoch (cupy)" "$py" examples/train_mnist.py --backend cupy --epochs 1 --no-figures --out "$out/resumed"
step "resume to 2 (cupy)" "$py" examples/train_mnist.py --resume "$out/resumed" --epochs 2 --no-figures
step "resume equals uninterrupted" "$py" - "$out/two" "$out/resumed" <<'EOF'
import sys
import numpy as np
from scratchvae import checkpoint
a, _ = checkpoint.load(sys.argv[1] + "/checkpoint.npz")
b, _ = checkpoint.load(sys.argv[2] + "/checkpoint.npz")
worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
print("max parameter difference after 2 vs 1 + 1 epochs:", worst)
sys.exit(0 if worst == 0.0 else 1)
EOF
step "default run, 10 epochs (cupy)" "$py" examples/train_mnist.py --backend cupy --out "$out/default"
step "bench_train GPU rows" "$py" benchmarks/bench_train.py --gpu-only --models mlp --batches 128,1024 --rounds 5 \
    --json "$out/bench_train.json"
step "IWAE k=5000 (cupy)" "$py" examples/evaluate_run.py "$out/default" --iwae-k 5000
step "two-level VampPrior model, 1 epoch (cupy)" "$py" examples/train_mnist.py --backend cupy --arch gated \
    --hidden 300,300 --latent-dim 40 --levels 2 --prior vampprior --batch-size 100 --epochs 1 --no-figures \
    --out "$out/hvae"
step "bench_train GPU row, two levels" "$py" benchmarks/bench_train.py --gpu-only --models hvae --batches 100 \
    --rounds 5 --json "$out/bench_train_hvae.json"

"$py" - "$out" "$gpu" <<'EOF' | tee -a "$log"
import json, pathlib, sys
out, gpu = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
summary = {"gpu": gpu, "steps": [{"step": n, "exit": int(c), "seconds": float(s)} for n, c, s in rows]}
default = out / "default" / "summary.json"
if default.exists():
    d = json.loads(default.read_text())
    summary["default_run"] = {"test_loss": d.get("test_loss"), "train_seconds": d.get("train_seconds")}
ev = out / "default" / "evaluation-last.json"
if ev.exists():
    e = json.loads(ev.read_text())
    summary["iwae"] = {"test_nll": e["test_nll_iwae"], "seconds": e["iwae_seconds"]}
bt = out / "bench_train.json"
if bt.exists():
    b = json.loads(bt.read_text())
    summary["bench_train"] = [{"model": r["model"], "batch": r["batch"], "device": r["device"],
                               "scratchvae_ms": r["median"]["scratchvae_s"] * 1e3,
                               "torch_ms": r["median"].get("torch_s", float("nan")) * 1e3,
                               "speedup": r["median"].get("speedup_vs_torch")}
                              for r in b["results"] if r["device"] == "cuda"]
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\n{gpu}")
print(f"{'check':<34} {'exit':>4} {'seconds':>8}")
for s in summary["steps"]:
    print(f"{s['step']:<34} {s['exit']:>4} {s['seconds']:>8.1f}")
if "default_run" in summary:
    r = summary["default_run"]
    print(f"default run: test negative ELBO {r['test_loss']:.3f} nats, {r['train_seconds']:.1f} s of training")
if "iwae" in summary:
    print(f"IWAE k=5000: test NLL {summary['iwae']['test_nll']:.2f} nats in {summary['iwae']['seconds']:.1f} s")
for r in summary.get("bench_train", []):
    print(f"{r['model']} B={r['batch']}: scratchvae {r['scratchvae_ms']:.2f} ms, PyTorch CUDA {r['torch_ms']:.2f} ms, "
          f"speedup {r['speedup']}")
EOF
exit $status
