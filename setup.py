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
    package_data={"vitopt.data": ["*.safetensors", "*.json"]},
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
        "tvm": ["apache-tvm>=0.27"],
        "gpu": ["onnxruntime-gpu"],
        "tensorrt": ["tensorrt"],
        "nncf": ["nncf"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["vitopt=vitopt.cli:main"]},
)
