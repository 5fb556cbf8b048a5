"""Installs mova-rt. `kernels/` ships as the subpackage `mova_rt.kernels` (never as a bare
top-level `kernels`, a name another PyPI package owns) and `benchmarks/` as `mova_rt.benchmarks`
(the code behind `mova-rt bench`)."""
from setuptools import setup

setup(
    name="mova-rt",
    version="0.1.0",
    description="A performance-engineered inference runtime for MOVA (video + audio generation)",
    python_requires=">=3.10",
    packages=["mova_rt", "mova_rt.models", "mova_rt.kernels", "mova_rt.benchmarks"],
    package_dir={"mova_rt.kernels": "kernels", "mova_rt.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.11",
        "numpy",
        "safetensors>=0.4",
        "transformers>=4.45",
        "diffusers>=0.33",
        "av>=12",
        "pillow",
        "tqdm",
        "ftfy",
        "sentencepiece",
        "tokenizers",
    ],
    extras_require={"triton": ["triton>=3.3"], "test": ["pytest", "pybind11"],
                    "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["mova-rt=mova_rt.cli:main"]},
)
