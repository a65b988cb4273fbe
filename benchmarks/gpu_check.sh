#!/usr/bin/env bash
# GPU check: on the GPU machine, make vitopt importable, diagnose AOTInductor CUDA loading, run
# gpu_bench.py, and the gpu-marked tests if time is left.
#
#   bash benchmarks/gpu_check.sh        # from the repo root; results under $OUT (default out/gpu-check)
#
# Whole run bounded by GPU_CHECK_BUDGET_S (default 280 s): each step gets a hard `timeout` from
# what is left, so one slow step cannot eat the rest. Steps (benchmarks/GPU.md has the timeline):
#   environment   GPU, driver, Python, torch, CUDA, Triton, g++ (about 7 s)
#   link          vitopt as a symlinked package tree on PYTHONPATH; no pip (no network there)
#   aoti-diag     benchmarks/aoti_diag.py, at most GPU_CHECK_DIAG_S (default 60 s): which way of
#                 building/opening a CUDA .pt2 works; its recommendation goes to the benchmark
#   gpu-tests     GPU_CHECK_TESTS=auto (default): before the benchmark only if GPU_CHECK_BENCH_MIN_S
#                 (default 190 s) would still be left after them, else after it if at least 40 s
#                 are left; before|after|skip force it. Each test file is its own pytest process
#                 with its own timeout (GPU_CHECK_TEST_FILE_S, default 90 s): a segfault costs
#                 that file only
#   gpu-bench     benchmarks/gpu_bench.py with what is left less 8 s (flags: GPU_BENCH_ARGS)
# Writes, under $OUT: gpu_check.log (all of it), aoti_diag.json + aoti_diag/ (each variant's
# log), gpu_bench.json / gpu_bench.md / gpu_bench.log, gpu_tests.txt.
# Exits 1 when any step failed (the others still run), 0 when all passed.
# Optional: GPU_CHECK_SKIP_DIAG=1, GPU_CHECK_DIAG_ARGS (extra aoti_diag.py flags), PYTHON
# (default python3). Wheels found in .whl/ (and split
# wheels .whl/parts/NAME.whl.part-*) are installed into /tmp/site first: see benchmarks/GPU.md.
set -u
set -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/out/gpu-check}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-280}
DIAG_S=${GPU_CHECK_DIAG_S:-60}
TESTS=${GPU_CHECK_TESTS:-auto}
BENCH_MIN_S=${GPU_CHECK_BENCH_MIN_S:-190}
TEST_FILE_S=${GPU_CHECK_TEST_FILE_S:-90}
WRAP_S=8
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
    echo "=== $name (limit ${limit}s, t=$(( $(date +%s) - START ))s)"
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
    "$PY" -c 'import os, sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| cuda available", torch.cuda.is_available(), "| cpus", os.cpu_count())'
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

# vitopt as a symlinked package tree (vitopt/ plus passes/ and kernels/ as vitopt.passes and
# vitopt.kernels, what setup.py's package_dir does). No pip: `pip install -e .` needs network
# for its build isolation there (the first H100 run lost 20 s to its retries).
link_vitopt() {
    rm -rf /tmp/vitopt-link && mkdir -p /tmp/vitopt-link/vitopt
    ln -s "$REPO"/vitopt/* /tmp/vitopt-link/vitopt/
    ln -s "$REPO/passes" /tmp/vitopt-link/vitopt/passes
    ln -s "$REPO/kernels" /tmp/vitopt-link/vitopt/kernels
}

# Checked (and everything later run) from a scratch folder: run from the repo root, the
# repo's own vitopt/ (which has no passes/) would shadow the linked package.
check_import() {
    "$PY" -c 'import vitopt, vitopt.passes, vitopt.kernels, vitopt.backends.aotinductor as a; print("vitopt from", vitopt.__file__, "| aotinductor available:", a.AOTInductorBackend().available())'
}

# Each gpu-marked test file in its own pytest process and time limit; output to gpu_tests.txt.
run_gpu_tests() {
    local file limit rc status=0
    local files
    files=$(grep -l "mark.gpu" "$REPO"/tests/test_*.py)
    [ -n "$files" ] || { echo "no gpu-marked tests found"; return 1; }
    for file in $files; do
        limit=$(min "$TEST_FILE_S" "$(( $(left) - WRAP_S ))")
        if [ "$limit" -lt 20 ]; then
            echo "--- $(basename "$file"): not run, no time left" | tee -a "$OUT/gpu_tests.txt"
            status=1; continue
        fi
        echo "--- $(basename "$file") (limit ${limit}s, VITOPT_AOTI_LOADER=${VITOPT_AOTI_LOADER:-})" \
            | tee -a "$OUT/gpu_tests.txt"
        timeout -k 5 "$limit" "$PY" -X faulthandler -m pytest -q -rs -m gpu -p no:cacheprovider \
            --rootdir "$REPO" "$file" 2>&1 | tee -a "$OUT/gpu_tests.txt"
        rc=$?
        echo "--- $(basename "$file"): exit $rc" | tee -a "$OUT/gpu_tests.txt"
        [ "$rc" -eq 0 ] || status=1
    done
    return "$status"
}

# The diagnostic's recommendation as shell variables (empty when it has none or did not run).
read_diag() {
    "$PY" - "$OUT/aoti_diag.json" <<'EOF'
import json, shlex, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    report = {}
rec = report.get("recommended") or {}
built = (report.get("builds") or {}).get("default", {}).get("built")
broken = ""
if built and not rec.get("fresh_process_loader"):
    broken = "AOTInductor: no loader opened the diagnostic's CUDA package (aoti_diag.json)"
for name, value in (("AOTI_FRESH_LOADER", rec.get("fresh_process_loader") or ""),
                    ("AOTI_SAME_LOADER", rec.get("same_process_loader") or ""),
                    ("AOTI_OPTIONS", json.dumps(rec.get("build_options") or {})),
                    ("AOTI_BROKEN", broken)):
    print(f"{name}={shlex.quote(value)}")
EOF
}

WORK=$(mktemp -d /tmp/gpu-check-XXXX)
cd "$WORK" || exit 1
export REPO PY OUT START BUDGET WRAP_S TEST_FILE_S PYTHONPATH=${PYTHONPATH:-}
export -f left min show_environment join_wheel_parts install_wheels check_import run_gpu_tests
echo "gpu_check: repo $REPO, out $OUT, budget ${BUDGET}s"
step environment 30 bash -c show_environment
if [ -d "$REPO/.whl" ]; then
    step wheels "$(min 180 "$(left)")" bash -c install_wheels &&
        export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
link_vitopt
export PYTHONPATH=/tmp/vitopt-link:$PYTHONPATH
step link 30 bash -c check_import

AOTI_FRESH_LOADER="" AOTI_SAME_LOADER="" AOTI_OPTIONS="{}" AOTI_BROKEN=""
DIAG_BUDGET=$(min "$DIAG_S" "$(( $(left) - 120 ))")
if [ "${GPU_CHECK_SKIP_DIAG:-0}" = 1 ] || [ "$DIAG_BUDGET" -lt 20 ]; then
    echo "=== aoti-diag: not run (GPU_CHECK_SKIP_DIAG=${GPU_CHECK_SKIP_DIAG:-0}, $(left)s left)"
else
    # shellcheck disable=SC2086
    step aoti-diag "$(( DIAG_BUDGET + 10 ))" "$PY" "$REPO/benchmarks/aoti_diag.py" --out "$OUT" \
        --budget-s "$DIAG_BUDGET" ${GPU_CHECK_DIAG_ARGS:-}
    eval "$(read_diag)"
    echo "aoti-diag -> fresh-process loader '${AOTI_FRESH_LOADER}', same-process loader" \
         "'${AOTI_SAME_LOADER}', build options ${AOTI_OPTIONS}${AOTI_BROKEN:+, $AOTI_BROKEN}"
fi
# The tests load in the process that built: use what worked there (the backend reads this).
if [ -n "$AOTI_SAME_LOADER" ] && [ "$AOTI_SAME_LOADER" != package ]; then
    export VITOPT_AOTI_LOADER=$AOTI_SAME_LOADER
fi

TESTS_DONE=0
tests_now() {
    : > "$OUT/gpu_tests.txt"
    step gpu-tests "$(( $(left) - WRAP_S ))" bash -c run_gpu_tests
    TESTS_DONE=1
}
if [ "$TESTS" = before ] || { [ "$TESTS" = auto ] &&
        [ $(( $(left) - 2 * TEST_FILE_S )) -ge "$BENCH_MIN_S" ]; }; then
    tests_now
fi

BENCH_FLAGS=()
[ -n "$AOTI_FRESH_LOADER" ] && BENCH_FLAGS+=(--aoti-loader "$AOTI_FRESH_LOADER")
[ "$AOTI_OPTIONS" != "{}" ] && BENCH_FLAGS+=(--aoti-options "$AOTI_OPTIONS")
[ -n "$AOTI_BROKEN" ] && BENCH_FLAGS+=(--skip-aoti "$AOTI_BROKEN")
BENCH_BUDGET=$(( $(left) - WRAP_S ))
# shellcheck disable=SC2086
step gpu-bench "$(( $(left) - 3 ))" "$PY" "$REPO/benchmarks/gpu_bench.py" --out "$OUT" \
    --budget-s "$BENCH_BUDGET" ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"} ${GPU_BENCH_ARGS:-}

if [ "$TESTS_DONE" = 0 ] && [ "$TESTS" != skip ]; then
    if [ "$TESTS" = after ] || [ "$(left)" -ge 40 ]; then
        tests_now
    else
        echo "=== gpu-tests: not run ($(left)s left; GPU_CHECK_TESTS=before runs them first)"
        echo "not run: $(left)s of the budget left after the benchmark" > "$OUT/gpu_tests.txt"
    fi
fi

echo "=== gpu_check done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
