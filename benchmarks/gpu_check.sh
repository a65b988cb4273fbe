#!/usr/bin/env bash
# GPU check: on the GPU machine, make vitopt importable, run the gpu-marked tests, run gpu_bench.py.
#
#   bash benchmarks/gpu_check.sh        # from the repo root; results under $OUT (default out/gpu-check)
#
# Whole run bounded by GPU_CHECK_BUDGET_S (default 400 s, under 7 minutes): each step gets a hard
# `timeout` from what is left, so one slow step cannot eat the rest. Writes, under $OUT:
#   gpu_check.log   this script's whole output       gpu_tests.txt  pytest -m gpu output
#   gpu_bench.json  one record per (model, config, batch) plus env   gpu_bench.md  the table
#   gpu_bench.log   the benchmark cells' own output
# Exits 1 when any step failed (the others still run), 0 when all passed.
# Optional: GPU_BENCH_ARGS (extra gpu_bench.py flags, e.g. "--models vit_base_patch16_224"),
# GPU_CHECK_SKIP_TESTS=1, PYTHON (default python3). Wheels found in .whl/ (and split wheels
# .whl/parts/NAME.whl.part-*) are installed into /tmp/site first: see benchmarks/GPU.md.
set -u
set -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/out/gpu-check}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-400}
START=$(date +%s)
FAILED=()
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

left() { echo $(( START + BUDGET - $(date +%s) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# step NAME LIMIT_S COMMAND...: run a program (or an exported function, through bash -c)
# with a hard time limit; log its time and status; a failure is remembered, not fatal.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    if [ "$limit" -lt 5 ]; then
        echo "=== $name: skipped, no time left"; FAILED+=("$name(no time)"); return 1
    fi
    echo "=== $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
    [ "$rc" -eq 0 ] || FAILED+=("$name(exit $rc)")
    return "$rc"
}

show_environment() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| cuda available", torch.cuda.is_available())'
    g++ --version | head -n 1
}

# A split wheel travels as .whl/parts/NAME.part-* over consecutive calls plus NAME.sha256
# (GPU.md); join each one and check it, so a set with a part missing fails loudly.
join_wheel_parts() {
    local sums name
    mkdir -p /tmp/vitopt-wheels
    for sums in "$REPO"/.whl/parts/*.whl.sha256; do
        [ -e "$sums" ] || continue
        name=$(basename "${sums%.sha256}")
        cat "$REPO/.whl/parts/$name".part-* > "/tmp/vitopt-wheels/$name" || return 1
        (cd /tmp/vitopt-wheels && sha256sum -c "$sums") || {
            echo "split wheel $name is incomplete or corrupt: were all its parts carried?"
            return 1
        }
    done
}

install_wheels() {
    local wheels=()
    join_wheel_parts || return 1
    for wheel in "$REPO"/.whl/*.whl /tmp/vitopt-wheels/*.whl; do
        [ -e "$wheel" ] && wheels+=("$wheel")
    done
    [ "${#wheels[@]}" -eq 0 ] && { echo "no carried wheels"; return 0; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"
}

# `pip install -e .` maps passes/ and kernels/ to vitopt.passes / vitopt.kernels (setup.py
# package_dir) with no network: --no-index, and --no-build-isolation uses the machine's own
# setuptools. Fallback when that fails: a symlinked package tree on PYTHONPATH.
# Runs in this shell (it may export PYTHONPATH); the pip call has its own time limit.
install_vitopt() {
    local limit=$1
    echo "=== install (limit ${limit}s)"
    if timeout -k 5 "$limit" "$PY" -m pip install -q --no-deps --no-build-isolation --no-index \
            -e "$REPO" && check_import; then
        echo "vitopt: editable install"
        return 0
    fi
    echo "vitopt: pip -e failed; using a symlinked package tree in /tmp/vitopt-link"
    rm -rf /tmp/vitopt-link && mkdir -p /tmp/vitopt-link/vitopt
    ln -s "$REPO"/vitopt/* /tmp/vitopt-link/vitopt/
    ln -s "$REPO/passes" /tmp/vitopt-link/vitopt/passes
    ln -s "$REPO/kernels" /tmp/vitopt-link/vitopt/kernels
    export PYTHONPATH=/tmp/vitopt-link:${PYTHONPATH:-}
    check_import || { FAILED+=("install"); return 1; }
}

# Checked (and everything later run) from a scratch folder: run from the repo root, the
# repo's own vitopt/ (which has no passes/) would shadow the installed package.
check_import() {
    "$PY" -c 'import vitopt, vitopt.passes, vitopt.kernels, vitopt.backends.aotinductor as a; print("vitopt from", vitopt.__file__, "| aotinductor available:", a.AOTInductorBackend().available())'
}

run_gpu_tests() {
    local files
    files=$(grep -l "mark.gpu" "$REPO"/tests/test_*.py)
    [ -n "$files" ] || { echo "no gpu-marked tests found"; return 1; }
    # shellcheck disable=SC2086
    "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider --rootdir "$REPO" $files
}

WORK=$(mktemp -d /tmp/gpu-check-XXXX)
cd "$WORK" || exit 1
export REPO PY PYTHONPATH=${PYTHONPATH:-}
export -f show_environment join_wheel_parts install_wheels check_import run_gpu_tests
echo "gpu_check: repo $REPO, out $OUT, budget ${BUDGET}s"
step environment 60 bash -c show_environment
if [ -d "$REPO/.whl" ]; then
    step wheels "$(min 180 "$(left)")" bash -c install_wheels &&
        export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
install_vitopt "$(min 120 "$(left)")"
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
    step gpu-tests "$(min 120 "$(( $(left) - 180 ))")" bash -c run_gpu_tests \
        > >(tee "$OUT/gpu_tests.txt")
fi
BENCH_BUDGET=$(( $(left) - 45 ))
# shellcheck disable=SC2086
step gpu-bench "$(( $(left) - 5 ))" "$PY" "$REPO/benchmarks/gpu_bench.py" --out "$OUT" \
    --budget-s "$BENCH_BUDGET" ${GPU_BENCH_ARGS:-}

echo "=== gpu_check done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
