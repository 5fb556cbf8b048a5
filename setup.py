"""Installs mova-rt. `kernels/` ships as the subpackage `mova_rt.kernels` (never as a bare
top-level `kernels`, a name another PyPI package owns) and `benchmarks/` as `mova_rt.benchmarks`
(the code behind `mova-rt bench`).

The optional extension mova_rt._C (csrc/, CMakeLists.txt) is built through CMake when cmake and
pybind11 are present (with its CUDA kernels when nvcc is too); otherwise, or if its build fails,
the install goes on without it and says why: every kernel in it has a PyTorch fallback.
MOVA_RT_BUILD_EXT=0 leaves it out and makes a pure-Python wheel (scripts/device_wheel.sh: the GPU
machine runs another Python than this one)."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import pybind11
        except ImportError:
            return self._skip("pybind11 is not installed")
        if shutil.which("cmake") is None:
            return self._skip("cmake is not installed")
        if shutil.which("nvcc") is None:
            print("mova-rt: nvcc not found: building mova_rt._C without its CUDA kernels")
        target = self.get_ext_fullpath(ext.name)
        with tempfile.TemporaryDirectory(prefix="mova-rt-cmake-") as build:
            try:
                subprocess.run(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                                f"-DPython_EXECUTABLE={sys.executable}"],
                               check=True, capture_output=True, text=True)
                subprocess.run(["cmake", "--build", build, "-j"], check=True,
                               capture_output=True, text=True)
            except subprocess.CalledProcessError as e:
                tail = (e.stderr or e.stdout or "").strip().splitlines()[-3:]
                return self._skip("its CMake build failed: " + " | ".join(tail))
            built = glob.glob(os.path.join(build, "mova_rt", "_C*"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(built[0], target)

    def _skip(self, why):
        print(f"mova-rt: skipping the optional extension mova_rt._C ({why}); the PyTorch "
              "fallbacks run instead")

setup(
    name="mova-rt",
    version="0.1.0",
    description="A performance-engineered inference runtime for MOVA (video + audio generation)",
    python_requires=">=3.10",
    packages=["mova_rt", "mova_rt.models", "mova_rt.fp8", "mova_rt.validate", "mova_rt.kernels",
              "mova_rt.benchmarks"],
    package_dir={"mova_rt.kernels": "kernels", "mova_rt.benchmarks": "benchmarks"},
    # the fp8 GEMM dispatch table, once built from GPU results (mova_rt/fp8/dispatch.py)
    package_data={"mova_rt": ["data/*.json"]},
    install_requires=[
        "torch>=2.11",
        "numpy",
        "safetensors>=0.4",
        # The exact path was compared with the reference under the versions in
        # mova_rt/versions.py; the upper bounds stop at the newest release checked (docs/parity.md).
        # transformers is not needed: mova-rt reads tokenizer.json and computes UMT5 itself.
        "diffusers>=0.36,<0.43",
        "av>=12",
        "pillow",
        "tqdm",
        "ftfy",
        "sentencepiece",
        "tokenizers>=0.22,<0.24",
    ],
    # nvidia-modelopt: the optional fp8 calibration path (quantize.calibrate), tested on the CPU;
    # onnx + onnxscript: `mova-rt build --backend tensorrt` exports ONNX; onnxruntime checks it
    # transformers (test): an outside oracle for the UMT5 encoder in tests/test_text_encoder.py
    extras_require={"triton": ["triton>=3.3"],
                    "test": ["pytest", "pybind11", "nvidia-modelopt", "onnx", "onnxscript",
                             "onnxruntime", "transformers"],
                    "tensorrt": ["onnx", "onnxscript"],
                    "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["mova-rt=mova_rt.cli:main"]},
    ext_modules=[] if os.environ.get("MOVA_RT_BUILD_EXT") == "0" else
    [Extension("mova_rt._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
