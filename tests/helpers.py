"""Helpers shared by the test files (not tests themselves)."""
import json
import os
import subprocess
import sys


def triton_compile_report(module: str, archs=(90, 89)) -> list:
    """kernels/_triton.compile_report for `module`'s COMPILE_CASES, in a subprocess without
    TRITON_INTERPRET (under the interpreter @triton.jit functions cannot be compiled)."""
    code = ("import json; from mova_rt.kernels._triton import compile_report; "
            f"print(json.dumps(compile_report({module!r}, {list(archs)!r})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
