"""Shared plumbing of the Triton kernels: interpreter detection and ahead-of-time compile checks.

- INTERPRET: True under TRITON_INTERPRET=1 (the CPU interpreter). The interpreter computes bf16
  `tl.dot` and bf16 elementwise math wrongly (environment.md), so kernels take it as a constexpr
  and upcast to fp32 before such math there; real GPUs keep bf16 operands for the tensor cores.
- compile_for(): builds a kernel for a real GPU architecture without a GPU (PTX + cubin) and
  reports its shared memory, so CI catches compile errors and shared-memory overflow for sm_90 and
  sm_89 on a CPU-only machine.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest shared memory one block may use (opt-in dynamic shared memory), bytes.
SHARED_MEMORY_LIMIT = {90: 232448, 89: 101376, 80: 166912}


def compile_for(kernel, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                num_stages: int = 3):
    """Compile `kernel` (a @triton.jit function) for sm_<arch>. signature maps every argument to
    its Triton type ("*bf16", "i32", "fp32", or "constexpr"); constexprs gives the constexpr
    values. Returns the compiled kernel (`.metadata.shared`, `.asm["ptx"]`, ...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32, by integer bit arithmetic
    (finite inputs) on every target: the Triton 3.6 interpreter's fp32 -> bf16 cast truncates,
    and on sm_90 a hardware cast round trip lets LLVM narrow the math to bf16 and contract
    `x + round(g * y)` into one fma.rn.bf16, dropping a rounding the eager path performs."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(x):
    """fp32 in [-448, 448] -> the nearest e4m3fn value (ties to even), kept in fp32, so the cast
    that follows is exact: the Triton 3.6 interpreter's fp32 -> fp8 cast drops the carry when a
    mantissa rounds up to the next power of two (7.98 becomes 4, not 8). Bit arithmetic: the
    step is 2^(e - 3) for exponent e >= -6 (normals; subnormals share the step 2^-9)."""
    bits = x.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.maximum(e, -6)
    step = ((e - 3 + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    v = tl.abs(x) / step                              # exact: a power-of-two division
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    return tl.where(x < 0, -r * step, r * step)


def compile_report(module_name: str, archs: list) -> list:
    """Compile every entry of `<module>.COMPILE_CASES` (dicts: name, kernel, signature,
    constexprs, num_warps[, num_stages, archs]) for each arch (of `archs` that the case lists);
    returns rows for a JSON report. Must run in a process without TRITON_INTERPRET (there
    @triton.jit yields interpreter functions)."""
    import importlib

    if INTERPRET:
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset")
    rows = []
    for case in importlib.import_module(module_name).COMPILE_CASES:
        for arch in [a for a in archs if a in case.get("archs", archs)]:
            k = compile_for(case["kernel"], case["signature"], case["constexprs"], arch,
                            case["num_warps"], case.get("num_stages", 3))
            rows.append({"name": case["name"], "arch": arch, "shared": k.metadata.shared,
                         "limit": SHARED_MEMORY_LIMIT[arch], "wgmma": "wgmma" in k.asm["ptx"]})
    return rows
