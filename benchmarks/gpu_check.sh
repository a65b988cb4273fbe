#!/usr/bin/env bash
# GPU check: on the GPU machine, install the carried TVM bundle, make vitopt importable, then
# the gpu-marked tests (with the AOTInductor diagnostic in the background) and the benchmark
# suite on a GPU matrix (benchmarks/suite.py, the same suite, records and schema as the CPU runs).
#
#   bash benchmarks/gpu_check.sh        # from the repo root; results under $OUT (default out/gpu-check)
#
# Whole run bounded by GPU_CHECK_BUDGET_S (default 420 s, under issue 7's 8 minutes): each step
# gets a hard `timeout` from what is left, so one slow step cannot eat the rest. Steps
# (benchmarks/GPU.md has the timeline):
#   environment     GPU, driver, Python, torch, CUDA, Triton, g++
#   wheels          .whl/*.whl, .whl/small/*.whl and split wheels .whl/parts/NAME.part-* (joined,
#                   sha256-checked) installed into /tmp/site with pip --no-index --target
#   tvm-cuda-setup  CUDA headers for NVRTC (carried .whl/small/cuda-headers.tar.xz unless the
#                   machine has a toolkit) -> CUDA_PATH; torch's libcudart dir -> LD_LIBRARY_PATH
#   link            vitopt as a symlinked package tree on PYTHONPATH; no pip (no network there)
#   tvm-cuda        only with GPU_CHECK_TVM=run: benchmarks/tvm_models.py --device cuda
#                   (GPU_CHECK_TVM_S, default 150 s; GPU_CHECK_TVM_ARGS). The suite's TVM cells
#                   measure the same builds in the suite's format, so it is off by default
#   aoti-diag       benchmarks/aoti_diag.py in the background (GPU_CHECK_DIAG_S, default 100 s)
#   gpu-tests       each gpu-marked test file in its own pytest process (GPU_CHECK_TEST_FILE_S,
#                   default 90 s; all of them GPU_CHECK_TESTS_S, default 150 s); GPU_CHECK_TESTS=skip
#   suite           benchmarks/suite.py on GPU_CHECK_MATRIX (default gpu-quick; a name in
#                   benchmarks/matrix/ or a path) with --budget-s = what is left less 8 s, each
#                   cell in its own process (a crash or hang is a failed record); AOTInductor
#                   cells use the diagnostic's same-process loader, or are skipped when it found
#                   none that opens a CUDA package. Extra flags: GPU_SUITE_ARGS. GPU_CHECK_SUITE=skip
#   gpu-bench       only with GPU_CHECK_BENCH=run: benchmarks/gpu_bench.py with what is left (its
#                   vitopt-jit and bounded compile profiles, which the suite has no cells for;
#                   GPU_BENCH_ARGS)
#   pack            everything but the main files into more.tar.gz (the tool returns 8 files)
# Writes, under $OUT: gpu_check.log (all of it), gpu_tests.txt, aoti_diag.json,
# suite/suite.json + suite/suite.md (rewritten after every cell), [tvm_models_cuda.json,
# gpu_bench.json], and more.tar.gz (suite/README.md, suite/cells.log with every cell's output,
# suite/*.png, aoti_diag.log, aoti_diag/, the other .md/.log files).
# Exits 1 when any step failed (the others still run), 0 when all passed; failed suite cells
# are in suite.json, not in the exit status.
# GPU_CHECK_AOTI (default skip): AOTInductor CUDA on this image. Run 4 found that no CUDA package
#   opens there, torch's own minimal one neither (GPU.md), so by default its GPU tests and suite
#   cells are recorded as skipped with that reason and the diagnostic does not run; "run" brings
#   back the diagnostic (in the background) and lets its result decide.
# Optional: GPU_CHECK_SKIP_DIAG=1, GPU_CHECK_DIAG_ARGS, PYTHON (default python3).
# GPU_CHECK_NO_TVM=1: no wheels and no TVM import check (the first of the two calls of GPU.md,
#   which carries only the first part of TVM's wheel: run a matrix without TVM cells then).
# GPU_CHECK_ONLY=diag: only environment, link and the AOTInductor diagnostic, in the foreground
# (no wheels needed: run 4's first call, while it carried the first TVM part).
# Its aoti_diag.json is also kept in /tmp/vitopt-aoti-diag.json; a later full run on the same
# warm machine reuses that instead of running the diagnostic again.
set -u
set -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/out/gpu-check}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
DIAG_S=${GPU_CHECK_DIAG_S:-100}
TVM_S=${GPU_CHECK_TVM_S:-150}
TESTS=${GPU_CHECK_TESTS:-run}
TVM=${GPU_CHECK_TVM:-skip}
SUITE=${GPU_CHECK_SUITE:-run}
BENCH=${GPU_CHECK_BENCH:-skip}
MATRIX=${GPU_CHECK_MATRIX:-gpu-quick}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
TEST_FILE_S=${GPU_CHECK_TEST_FILE_S:-90}  # the stage-lowering GPU test builds for ~40 s
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
    for wheel in "$REPO"/.whl/*.whl "$REPO"/.whl/small/*.whl /tmp/vitopt-wheels/*.whl; do
        [ -e "$wheel" ] && wheels+=("$wheel")
    done
    [ "${#wheels[@]}" -eq 0 ] && { echo "no carried wheels"; return 0; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"
}

# TVM on the GPU machine: NVRTC (cuda-bindings, carried) needs the CUDA headers, which torch's
# wheels do not ship complete (no CCCL): .whl/small/cuda-headers.tar.xz carries them (GPU.md), used
# unless the machine has a toolkit. TVM's CUDA runtime links libcudart.so.13: torch's wheel has it.
setup_tvm_cuda() {
    if [ -f /usr/local/cuda/include/cuda_runtime.h ] && [ -d /usr/local/cuda/include/cccl ]; then
        echo "CUDA_PATH=/usr/local/cuda (the machine's toolkit)"
    elif [ -f "$REPO/.whl/small/cuda-headers.tar.xz" ]; then
        mkdir -p /tmp/cuda-headers && tar -xJf "$REPO/.whl/small/cuda-headers.tar.xz" -C /tmp/cuda-headers &&
            echo "CUDA_PATH=/tmp/cuda-headers/cuda (carried headers)"
    else
        echo "no CUDA headers here or carried: TVM cannot compile CUDA on this machine"
    fi
    "$PY" - <<'PYEOF'
import glob, os, site
dirs = sorted({os.path.dirname(p) for base in site.getsitepackages()
               for p in glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*"))})
print("libcudart dirs:", dirs)
open("/tmp/vitopt-cudart-dirs", "w").write(":".join(dirs))
PYEOF
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
    "$PY" -c 'import vitopt, vitopt.passes, vitopt.kernels, vitopt.backends.aotinductor as a; print("vitopt from", vitopt.__file__, "| aotinductor available:", a.AOTInductorBackend().available())' || return 1
    "$PY" -c 'from vitopt.backends import get_backend; b = get_backend("tvm"); print("tvm available:", b.available(), "| version", b.version() if b.available()[0] else "-")' || return 1
    [ "$NO_TVM" = 1 ] && return 0  # TVM's wheel has not all travelled yet (also ONLY=diag)
    "$PY" -c 'import tvm; print("tvm", tvm.__version__, "| cuda device:", tvm.cuda(0).exist, "| compiler loaded:", not tvm.base._RUNTIME_ONLY)'
}

# Each gpu-marked test file in its own pytest process and time limit; output to gpu_tests.txt.
# TVM's first (the GPU path run 3 never got to check), the AOTInductor ones last; when
# AOTInductor is skipped (GPU_CHECK_AOTI) or the diagnostic found no loader that opens a CUDA
# package (AOTI_BROKEN either way), the tests that build one are not run (run 3: each spent its
# whole limit building a package that then segfaulted).
run_gpu_tests() {
    set -o pipefail  # `bash -c` does not inherit it: pytest's status, not tee's
    local file limit rc status=0
    local files
    local all
    all=$(grep -l "mark.gpu" "$REPO"/tests/test_*.py)
    files=$(printf '%s\n' $all | grep tvm
            printf '%s\n' $all | grep -v -e tvm -e aotinductor -e test_compile
            printf '%s\n' $all | grep -v tvm | grep -e aotinductor -e test_compile)
    [ -n "$files" ] || { echo "no gpu-marked tests found"; return 1; }
    for file in $files; do
        if [ -n "${AOTI_BROKEN:-}" ] && printf '%s' "$file" | grep -q -e aotinductor -e test_compile; then
            echo "--- $(basename "$file"): not run, it builds AOTInductor CUDA packages;" \
                 "$AOTI_BROKEN" | tee -a "$OUT/gpu_tests.txt"
            continue
        fi
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
ONLY=${GPU_CHECK_ONLY:-}
NO_TVM=${GPU_CHECK_NO_TVM:-0}
[ "$ONLY" = diag ] && NO_TVM=1
export REPO PY OUT START BUDGET WRAP_S TEST_FILE_S ONLY NO_TVM PYTHONPATH=${PYTHONPATH:-}
export -f left min show_environment join_wheel_parts install_wheels setup_tvm_cuda check_import run_gpu_tests
echo "gpu_check: repo $REPO, out $OUT, budget ${BUDGET}s"
DIAG_KEPT=${GPU_CHECK_DIAG_KEPT:-/tmp/vitopt-aoti-diag.json}
step environment 30 bash -c show_environment
if [ -d "$REPO/.whl" ] && [ "$NO_TVM" != 1 ]; then
    step wheels "$(min 180 "$(left)")" bash -c install_wheels &&
        export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
step tvm-cuda-setup 40 bash -c setup_tvm_cuda
[ -d /tmp/cuda-headers/cuda ] && export CUDA_PATH=/tmp/cuda-headers/cuda
[ -s /tmp/vitopt-cudart-dirs ] && export LD_LIBRARY_PATH=$(cat /tmp/vitopt-cudart-dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
link_vitopt
export PYTHONPATH=/tmp/vitopt-link:$PYTHONPATH
step link 30 bash -c check_import

# 1. Optional: TVM CUDA through benchmarks/tvm_models.py (the suite's TVM cells replace it).
if [ "$TVM" = run ]; then
    # shellcheck disable=SC2086
    step tvm-cuda "$(min "$TVM_S" "$(( $(left) - 60 ))")" "$PY" "$REPO/benchmarks/tvm_models.py" \
        --device cuda --out "$OUT" ${GPU_CHECK_TVM_ARGS:-}
fi

# 2. AOTInductor diagnostic in the background, beside the tests and before the suite (run 3:
#    beside the TVM compiles, its two 70 s Inductor builds slowed them past their cap). Read
#    back before the suite, whose AOTInductor cells follow its recommendation. GPU_CHECK_ONLY=diag
#    runs it alone in the foreground; a later run on the same machine reuses its result.
DIAG_PID=""
AOTI_SAME_LOADER="" AOTI_FRESH_LOADER="" AOTI_OPTIONS="{}" AOTI_BROKEN=""
if [ "${GPU_CHECK_AOTI:-skip}" != run ] && [ "$ONLY" != diag ]; then
    AOTI_BROKEN="AOTInductor: not run (GPU_CHECK_AOTI=skip: in run 4 no CUDA package opened on this image, torch's own minimal one neither; benchmarks/GPU.md)"
    echo "=== aoti-diag: not run; $AOTI_BROKEN"
    export AOTI_BROKEN
elif [ "$ONLY" = diag ]; then
    # shellcheck disable=SC2086
    step aoti-diag "$(( $(left) - WRAP_S ))" "$PY" "$REPO/benchmarks/aoti_diag.py" --out "$OUT" \
        --budget-s "$(( $(left) - WRAP_S - 15 ))" ${GPU_CHECK_DIAG_ARGS:---builds default,plain-mlp,embed-kernels --loads package,loader-class,so-runner --gdb} \
        2>&1 | tee "$OUT/aoti_diag.log"
    cp "$OUT/aoti_diag.json" "$DIAG_KEPT" 2>/dev/null && echo "kept for the next call: $DIAG_KEPT"
    TESTS=skip SUITE=skip BENCH=skip
elif [ "${GPU_CHECK_SKIP_DIAG:-0}" != 1 ] && [ -s "$DIAG_KEPT" ]; then
    cp "$DIAG_KEPT" "$OUT/aoti_diag.json"
    echo "=== aoti-diag: reusing $DIAG_KEPT (GPU_CHECK_ONLY=diag ran it earlier on this machine)"
    eval "$(read_diag)"
    echo "aoti-diag -> same-process loader '${AOTI_SAME_LOADER}', fresh-process loader" \
         "'${AOTI_FRESH_LOADER}', build options ${AOTI_OPTIONS}${AOTI_BROKEN:+, $AOTI_BROKEN}"
    export AOTI_BROKEN  # run_gpu_tests leaves out the tests that build CUDA packages
elif [ "${GPU_CHECK_SKIP_DIAG:-0}" != 1 ] && [ "$(left)" -gt 120 ]; then
    echo "=== aoti-diag: started in the background (budget ${DIAG_S}s; log aoti_diag.log)"
    # shellcheck disable=SC2086
    timeout -k 10 "$(( DIAG_S + 15 ))" "$PY" "$REPO/benchmarks/aoti_diag.py" --out "$OUT" \
        --budget-s "$DIAG_S" ${GPU_CHECK_DIAG_ARGS:---builds default,no-pool --loads package,single-threaded,so-runner} \
        > "$OUT/aoti_diag.log" 2>&1 &
    DIAG_PID=$!
fi

# 3. The gpu-marked tests (each file its own process and limit).
: > "$OUT/gpu_tests.txt"
if [ "$TESTS" != skip ]; then
    step gpu-tests "$(min "$TESTS_S" "$(( $(left) - 40 ))")" bash -c run_gpu_tests
fi

# 4. The diagnostic's result (when it ran in the background), then the suite with what is left.
if [ -n "$DIAG_PID" ]; then
    wait "$DIAG_PID"; echo "=== aoti-diag: exit $? (t=$(( $(date +%s) - START ))s)"
    tail -n 25 "$OUT/aoti_diag.log"
    eval "$(read_diag)"
    echo "aoti-diag -> same-process loader '${AOTI_SAME_LOADER}', fresh-process loader" \
         "'${AOTI_FRESH_LOADER}', build options ${AOTI_OPTIONS}${AOTI_BROKEN:+, $AOTI_BROKEN}"
fi
SUITE_FLAGS=()
[ -n "$AOTI_BROKEN" ] && SUITE_FLAGS+=(--skip-backend "aotinductor: $AOTI_BROKEN")
case "$MATRIX" in      # a name in benchmarks/matrix/, or a path (relative: to the repo)
    /*) MATRIX_FILE=$MATRIX ;;
    */*|*.json) MATRIX_FILE=$REPO/$MATRIX ;;
    *) MATRIX_FILE=$REPO/benchmarks/matrix/$MATRIX.json ;;
esac
SUITE_BUDGET=$(( $(left) - WRAP_S - 10 ))
if [ "$SUITE" = skip ] && [ "$ONLY" = diag ]; then
    echo "=== suite: not in GPU_CHECK_ONLY=diag"
elif [ "$SUITE" = skip ]; then
    echo "=== suite: skipped (GPU_CHECK_SUITE=skip)"
elif [ "$SUITE_BUDGET" -ge 40 ]; then
    # The suite's AOTInductor cells build and load in one process (compile_model checks the
    # engine), so they get the diagnostic's same-process loader when it found one.
    # shellcheck disable=SC2086
    VITOPT_AOTI_LOADER=${AOTI_SAME_LOADER:-${VITOPT_AOTI_LOADER:-}} \
        step suite "$(( $(left) - 3 ))" "$PY" "$REPO/benchmarks/suite.py" "$MATRIX_FILE" \
        --isolate --out "$OUT/suite" --budget-s "$SUITE_BUDGET" \
        ${SUITE_FLAGS[@]+"${SUITE_FLAGS[@]}"} ${GPU_SUITE_ARGS:-}
else
    echo "=== suite: not run (${SUITE_BUDGET}s left)"; FAILED+=("suite(no time)")
fi

# 5. Optional: gpu_bench.py (vitopt-jit, bounded compile profiles) with what is left.
if [ "$BENCH" = run ]; then
    BENCH_FLAGS=()
    [ -n "$AOTI_FRESH_LOADER" ] && BENCH_FLAGS+=(--aoti-loader "$AOTI_FRESH_LOADER")
    [ "$AOTI_OPTIONS" != "{}" ] && BENCH_FLAGS+=(--aoti-options "$AOTI_OPTIONS")
    [ -n "$AOTI_BROKEN" ] && BENCH_FLAGS+=(--skip-aoti "$AOTI_BROKEN")
    BENCH_BUDGET=$(( $(left) - WRAP_S ))
    if [ "$BENCH_BUDGET" -ge 40 ]; then
        # shellcheck disable=SC2086
        step gpu-bench "$(( $(left) - 3 ))" "$PY" "$REPO/benchmarks/gpu_bench.py" --out "$OUT" \
            --budget-s "$BENCH_BUDGET" ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"} ${GPU_BENCH_ARGS:-}
    else
        echo "=== gpu-bench: not run (${BENCH_BUDGET}s left)"
    fi
fi

# 6. The tool returns at most 8 files from $OUT: the main ones stay, the rest go in a tarball.
pack_outputs() {
    local keep=(gpu_check.log gpu_tests.txt aoti_diag.json tvm_models_cuda.json gpu_bench.json
                suite/suite.json suite/suite.md) rest
    rest=$(cd "$OUT" && find . -type f ! -name more.tar.gz | sed 's|^\./||' | sort |
           grep -vxF -f <(printf '%s\n' "${keep[@]}") || true)
    [ -n "$rest" ] || return 0
    (cd "$OUT" && printf '%s\n' "$rest" | tar -czf more.tar.gz -T - &&
        printf '%s\n' "$rest" | xargs -d '\n' rm -f && find . -mindepth 1 -type d -empty -delete)
    echo "packed into more.tar.gz: $(printf '%s\n' "$rest" | tr '\n' ' ')"
}
pack_outputs || echo "pack: failed; files left as they are"

echo "=== gpu_check done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -laR "$OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
