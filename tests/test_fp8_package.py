"""mova_rt/fp8 is one package that the pipeline uses and that never imports the pipeline (issue 17,
item 4): importing every module of it leaves mova_rt.pipeline, mova_rt.engine and the CLI
unimported."""

import subprocess
import sys


def test_fp8_package_never_imports_the_pipeline():
    code = ("import pkgutil, importlib, sys, mova_rt.fp8 as p\n"
            "for m in pkgutil.iter_modules(p.__path__):\n"
            "    importlib.import_module('mova_rt.fp8.' + m.name)\n"
            "bad = [n for n in ('mova_rt.pipeline', 'mova_rt.engine', 'mova_rt.cli', "
            "'mova_rt.quantize_cmd') if n in sys.modules]\n"
            "print(sorted(m.name for m in pkgutil.iter_modules(p.__path__)), bad)\n"
            "sys.exit(1 if bad else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "block" in run.stdout and "dispatch" in run.stdout and "cuda_ext" in run.stdout
