#!/usr/bin/env bash
# The README's CPU benchmark series in one command: every row of its tables
# (host cost per step, small token counts, the large shapes, DoRA 4096²), one
# after the other, each command's output in its own file and every row in one
# CSV, then benchmarks/targets.py checks the project's targets on that CSV.
#
#   bash benchmarks/cpu_series.sh            # from the repo root, after `make setup`
#   OUT=/some/folder bash benchmarks/cpu_series.sh
#
# OUT defaults to benchmarks/results/cpu-<N>core-<vendor>-<avx512|avx2>, the
# machine's folder of raw results (N: CPUs; vendor and SIMD level from
# /proc/cpuinfo), so a rerun overwrites that machine's files of the series
# and `git diff` shows what moved. About 9 minutes on a 2-core machine.
# Exit status: targets.py's (0 all met, 1 one missed, 2 one not run).
set -u

cd "$(dirname "$0")/.." || exit 1
if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

# The machine's folder: CPUs, vendor and SIMD level (machines of one vendor
# differ: an AMD EPYC may or may not have AVX-512).
vendor="$(uname -m)"
case "$(grep -m1 '^vendor_id' /proc/cpuinfo 2>/dev/null)" in
    *AuthenticAMD*) vendor=amd ;;
    *GenuineIntel*) vendor=intel ;;
esac
flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)"
isa=""
case "$flags" in
    *" avx512f "*) isa=-avx512 ;;
    *" avx2 "*) isa=-avx2 ;;
esac
OUT="${OUT:-benchmarks/results/cpu-$(nproc)core-$vendor$isa}"
mkdir -p "$OUT"
CSV="$OUT/cpu.csv"
rm -f "$CSV"

# bench FILE ARGS...: one command of the series, its output in $OUT/FILE.txt.
bench() {
    local name="$1"
    shift
    echo "== $name: python -m lora_kernels.bench $*"
    "$PY" -m lora_kernels.bench --no-progress --csv "$CSV" "$@" > "$OUT/$name.txt" 2>&1 \
        || echo "$name failed: see $OUT/$name.txt"
}

bench overhead --overhead --profile
bench small_tokens --in-features 1024 --out-features 1024 --tokens 16 64 256 --rank 16 \
    --dropout 0.05 --repeat 200
bench linear_p005 --in-features 4096 --out-features 4096 --tokens 2048 --rank 16 \
    --dropout 0.05 --repeat 11
bench linear_p0 --in-features 4096 --out-features 4096 --tokens 2048 --rank 16 --dropout 0 \
    --repeat 11
bench merged --layer merged --in-features 1024 --out-features 3072 --tokens 4096 --rank 8 \
    --dropout 0.05 --repeat 7
bench embedding --layer embedding --in-features 32000 --out-features 1024 --tokens 4096 \
    --rank 8 --repeat 20
bench held --in-features 1024 --out-features 1024 --tokens 2048 --rank 16 --dropout 0.1 \
    --repeat 5
bench dora_linear_4096_p0.05 --dora --in-features 4096 --out-features 4096 --tokens 2048 \
    --rank 16 --dropout 0.05 --repeat 10 --providers floor lora_kernels peft reference
bench default

echo "== targets ($CSV)"
"$PY" benchmarks/targets.py "$CSV" | tee "$OUT/targets.txt"
exit "${PIPESTATUS[0]}"
