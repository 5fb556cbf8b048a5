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
