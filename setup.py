"""vitopt: a compiler-style optimization toolkit for Vision Transformers.

`passes/` and `kernels/` live at the top of the repository and install as
`vitopt.passes` and `vitopt.kernels` through package_dir. Never import the bare
`passes` / `kernels` names: that would load a second copy of every module.
"""
from setuptools import setup

setup(
    name="vitopt",
    version="0.1.0",
    description="Trace, optimize and deploy Vision Transformers on real inference engines",
    python_requires=">=3.10",
    packages=[
        "vitopt",
        "vitopt.ir",
        "vitopt.frontend",
        "vitopt.lower",
        "vitopt.backends",
        "vitopt.data",
        "vitopt.passes",
        "vitopt.kernels",
    ],
    package_dir={"vitopt.passes": "passes", "vitopt.kernels": "kernels"},
    package_data={"vitopt.data": ["*.safetensors", "*.json"], "vitopt.kernels": ["tuning/*.json"]},
    install_requires=[
        "torch>=2.9",
        "numpy",
        "timm",
        "transformers",
        "safetensors",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "openvino",
        "scikit-learn",
        "pillow",
    ],
    extras_require={
        # TVM: llvm builds need only apache-tvm; CUDA builds (also cross-compiled on a machine
        # without a GPU) compile with NVRTC through cuda-bindings; MetaSchedule's worker pool
        # needs psutil and cloudpickle. apache-tvm-ffi 0.1.15.x segfaults in tvm.ir.save_json
        # with apache-tvm 0.27.0.post1 (MetaSchedule's database needs it): pinned below 0.1.15.
        "tvm": ["apache-tvm>=0.27", "apache-tvm-ffi<0.1.15", "cuda-bindings>=13", "psutil",
                "cloudpickle"],
        "gpu": ["onnxruntime-gpu"],
        "tensorrt": ["tensorrt"],
        "nncf": ["nncf"],
        "bench": ["nncf", "matplotlib"],
        # The test suite exercises every engine that installs on a CPU-only machine.
        "test": ["pytest", "pytest-xdist", "apache-tvm>=0.27", "apache-tvm-ffi<0.1.15", "cuda-bindings>=13",
                 "psutil", "cloudpickle",
                 "nncf", "matplotlib"],
    },
    entry_points={"console_scripts": ["vitopt=vitopt.cli:main"]},
)
