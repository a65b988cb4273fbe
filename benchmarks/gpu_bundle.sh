#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) with what the GPU machine lacks for benchmarks/gpu_check.sh:
#   .whl/parts/apache_tvm-*.whl.part-aa, -ab + .sha256   the TVM wheel (100 MB) in two parts, so
#                                                       each call carries < 64 MiB (GPU.md)
#   .whl/small/*.whl        tvm-ffi, cuda-bindings (NVRTC), cuda-pathfinder, ml_dtypes, psutil,
#                           cloudpickle, for the GPU machine's Python (3.12 there)
#   .whl/small/cuda-headers.tar.xz   CUDA 13 headers incl. CCCL, which NVRTC needs and torch's
#                           wheels do not ship (from this machine's /usr/local/cuda)
# Nothing is carried for the benchmark suite: the GPU image already has timm (1.0.29 in runs 1-2),
# scikit-learn, matplotlib, onnx and onnxruntime (benchmarks/GPU.md, "The benchmark").
# Run here (it needs the package registry):  bash benchmarks/gpu_bundle.sh [PYTHON_VERSION]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYVER=${1:-3.12}
PIP=${PIP:-"$REPO/.venv/bin/python -m pip"}
TVM_VERSION=${TVM_VERSION:-0.27.0.post1}
PART_BYTES=${PART_BYTES:-56000000}
WHL="$REPO/.whl"
rm -rf "$WHL/parts" "$WHL/small" && mkdir -p "$WHL/parts" "$WHL/small"

download() {  # download NAME... into $1 for the GPU machine's Python
    local dest=$1; shift
    $PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --platform manylinux_2_28_x86_64 --dest "$dest" "$@"
}
download "$WHL/small" "apache-tvm-ffi<0.1.15" \
    cuda-bindings cuda-pathfinder ml_dtypes psutil cloudpickle
tmp=$(mktemp -d)
download "$tmp" "apache-tvm==$TVM_VERSION"
wheel=$(basename "$tmp"/apache_tvm-*.whl)
split -b "$PART_BYTES" "$tmp/$wheel" "$WHL/parts/$wheel.part-"
(cd "$tmp" && sha256sum "$wheel") > "$WHL/parts/$wheel.sha256"
rm -rf "$tmp"

cuda=$(readlink -f /usr/local/cuda)
hdr=$(mktemp -d)
mkdir -p "$hdr/cuda/targets/x86_64-linux"
cp -rL "$cuda/include" "$hdr/cuda/include"
ln -s ../../include "$hdr/cuda/targets/x86_64-linux/include"
tar -C "$hdr" -cf - cuda | xz -T0 -6 > "$WHL/small/cuda-headers.tar.xz"
rm -rf "$hdr"
du -ab "$WHL"/parts/* "$WHL"/small/* | sort -k2
echo "call 1 carries .whl/parts/$wheel.part-aa; call 2 (at once) the rest: see benchmarks/GPU.md"
