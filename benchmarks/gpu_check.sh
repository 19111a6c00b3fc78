#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (no internet): versions, the
# gpu-marked tests, the CUDA bench (headline Linear 4096, Llama-7B MLP shape,
# a tokens sweep with a plot), the QLoRA example, the DoRA rows and merge_/unmerge_
# bandwidth.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # from the repo root
#
# Every step is guarded (|| true) and under `timeout`; each step's timeout is
# also capped by what is left of BUDGET_S (default 450 s), so the whole script
# ends within about 7.5 minutes. Per-step exit codes land in $OUT/steps.txt
# (124 = timed out).
set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-bench_out/gpu}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-450}"
if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's lora_kernels
export PYTHONUNBUFFERED=1

# step NAME TIMEOUT_S CMD...: run CMD under timeout, log its exit code.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "== $name: skipped, ${left}s of BUDGET_S=${BUDGET_S}s left" | tee -a "$OUT/steps.txt"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    echo "== $name (timeout ${limit}s, at ${SECONDS}s)"
    local t0=$SECONDS rc=0
    timeout -k 5 "$limit" "$@" || rc=$?
    echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" >> "$OUT/steps.txt"
    return 0
}

step nvidia_smi 20 nvidia-smi 2>&1 | tee "$OUT/versions.txt" || true
# Both extensions, in place, against this machine's torch: lora_kernels._C
# defines the ops (their C++ autograd and composites), lora_kernels._C_cuda
# adds the CUDA kernels for this GPU (sm_90).
step build 150 env LORA_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    "$PY" setup.py -q build_ext --inplace 2>&1 | tail -n 20 | tee "$OUT/build.txt" || true
step versions 45 "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/versions.txt" || true
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
import lora_kernels
from lora_kernels import backends
print("lora_kernels", lora_kernels.__version__, "from", lora_kernels.__file__)
for n in backends.NAMES:
    print(f"  backend {n} on cuda:", backends.reasons(n, "cuda") or "ok")
EOF

# Autotuning off here (first config of each kernel): compiling every config of
# every kernel for every test dtype would not fit the budget; the bench steps
# below autotune as usual.
step pytest_gpu 100 env LORA_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 \
    | tee "$OUT/pytest_gpu.txt" || true

BENCH=("$PY" -m lora_kernels.bench --device cuda --dtype bfloat16 --layer linear --rank 16
       --dropout 0.05 --no-progress --providers floor reference triton cuda loralib peft)

# Headline: Linear 4096 -> 4096, 8192 tokens, r16, bf16.
step linear_4096 75 "${BENCH[@]}" --in-features 4096 --out-features 4096 --tokens 8192 \
    --csv "$OUT/cuda.csv" 2>&1 | tee "$OUT/linear_4096.txt" || true

# Llama-7B MLP up/gate projection: 4096 -> 11008.
step mlp_11008 75 "${BENCH[@]}" --in-features 4096 --out-features 11008 --tokens 8192 \
    --csv "$OUT/cuda.csv" 2>&1 | tee "$OUT/mlp_11008.txt" || true

# Host-bound: Linear 2048 -> 2048, 4096 tokens, bf16, eager, where the frozen
# GEMMs take about 0.1 ms and a step's host cost decides.
step host_bound 60 "${BENCH[@]}" --in-features 2048 --out-features 2048 --tokens 4096 \
    --csv "$OUT/cuda.csv" 2>&1 | tee "$OUT/host_bound_2048.txt" || true

# Tokens sweep (--tokens takes several values), plotted; its own CSV.
step sweep 90 "${BENCH[@]}" --in-features 4096 --out-features 4096 \
    --tokens 1024 2048 4096 8192 --csv "$OUT/cuda_sweep.csv" --plot "$OUT/linear_bf16.png" \
    2>&1 | tee "$OUT/sweep.txt" || true

# QLoRA: a Llama (hidden 2048, 4 layers) with a bitsandbytes NF4 base, PEFT
# plain against patched: peak memory per step and ms per step.
step qlora 60 "$PY" python/qlora_finetune.py --device cuda --hidden 2048 --layers 4 \
    --seq 256 --batch 4 --steps 12 2>&1 | tee "$OUT/qlora_cuda.txt" || true

# DoRA: Linear 4096 -> 4096, 2048 tokens, r16, bf16, dropout 0 and 0.05, against
# PEFT's use_dora=True (loralib has none).
for p in 0 0.05; do
    step "dora_p$p" 45 "$PY" -m lora_kernels.bench --device cuda --dtype bfloat16 --dora \
        --in-features 4096 --out-features 4096 --tokens 2048 --rank 16 --dropout "$p" \
        --no-progress --providers floor reference triton cuda peft --csv "$OUT/cuda.csv" \
        2>&1 | tee "$OUT/dora_p$p.txt" || true
done

# merge_ / unmerge_ on a 4096x4096 bf16 W, r16: GB/s vs one read + write of W.
step merge 45 "$PY" - <<'EOF' 2>&1 | tee "$OUT/merge.txt" || true
import torch
from triton.testing import do_bench

import lora_kernels  # noqa: F401  (registers torch.ops.lora_kernels)
from lora_kernels import backends

n, r, scaling = 4096, 16, 2.0
dev, dt = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)
W = torch.randn(n, n, device=dev, dtype=dt, generator=g) * n ** -0.5
A = torch.randn(r, n, device=dev, dtype=dt, generator=g) * n ** -0.5
B = torch.randn(n, r, device=dev, dtype=dt, generator=g) * 0.1
ops = torch.ops.lora_kernels
print(f"merge_/unmerge_: W {n}x{n} {dt}, r={r}, backend {backends.resolved_name(dev)}, "
      f"{torch.cuda.get_device_name(0)}")
W0 = W.clone()
ops.merge_(W, A, B, scaling, False, 1, [0])
ops.unmerge_(W, A, B, scaling, False, 1, [0])
print("merge then unmerge, max |W - W0|:", (W.float() - W0.float()).abs().max().item())
nbytes = 2 * n * n * W.element_size()  # one read + one write of W
runs = {
    "merge_": lambda: ops.merge_(W, A, B, scaling, False, 1, [0]),
    "unmerge_": lambda: ops.unmerge_(W, A, B, scaling, False, 1, [0]),
    "torch W.addmm_(B, A) (baseline)": lambda: W.addmm_(B, A, alpha=scaling),
}
for name, fn in runs.items():
    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    print(f"{name:<32} median {med * 1e3:8.1f} us (p20 {p20 * 1e3:.1f}, p80 {p80 * 1e3:.1f})"
          f"  {nbytes / (med * 1e-3) / 1e9:7.1f} GB/s of 2*{n}*{n}*{W.element_size()} bytes")
EOF

echo "== done in ${SECONDS}s; outputs in $OUT"
cat "$OUT/steps.txt" 2>/dev/null || true
ls -la "$OUT" || true
