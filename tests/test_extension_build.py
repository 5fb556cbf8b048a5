"""The optional C++ extension builds with CMake + pybind11 and imports (no GPU needed)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_and_imports(tmp_path):
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    so = [f for f in os.listdir(build / "mova_rt") if f.startswith("_C")]
    assert len(so) == 1
    spec = importlib.util.spec_from_file_location("_C", build / "mova_rt" / so[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_info().startswith("mova_rt._C built with")
    # with nvcc present the CUDA kernels are compiled in (sm_90a, sm_89, sm_80); without a GPU
    # a call reaches the CUDA runtime and fails with its message, not a crash
    if shutil.which("nvcc"):
        assert mod.has_cuda and "with CUDA kernels" in mod.build_info()
        if not _has_gpu():
            with pytest.raises(RuntimeError, match="quantize_rows_fp8: "):
                mod.quantize_rows_fp8(0, 8, 0, 0, 4, 8, 0)


def _has_gpu():
    import torch
    return torch.cuda.is_available()


def test_installed_extension_and_fallback():
    """The install built mova_rt._C (setup.py, when cmake and pybind11 are present); on a machine
    without a GPU the activation quantization takes the PyTorch path, bit for bit the same."""
    import torch

    from mova_rt.fp8 import cuda_ext, quantize
    if shutil.which("cmake"):
        assert cuda_ext._C is not None, "setup.py did not build mova_rt._C"
    x = torch.randn(45, 160).bfloat16()
    q, s = cuda_ext.quantize_rows(x)
    rq, rs = quantize.quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_cuda_quantize_rows_is_bit_identical_to_the_reference():
    import torch

    from mova_rt.fp8 import cuda_ext, quantize
    assert cuda_ext.available()
    for shape in ((403, 5120), (1, 1536), (77, 13824), (3, 100)):
        x = (torch.randn(shape, device="cuda") * 7).bfloat16()
        x[0] = 0                                       # an all-zero row keeps scale 1
        q, s = cuda_ext.quantize_rows(x)
        rq, rs = quantize.quantize_rows(x)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    strided = torch.randn(64, 2 * 1536, device="cuda").bfloat16()[:, :1536]
    q, s = cuda_ext.quantize_rows(strided)
    rq, rs = quantize.quantize_rows(strided)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
