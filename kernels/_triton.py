"""Shared plumbing of the Triton kernels: interpreter detection and ahead-of-time compile checks.

- INTERPRET: True under TRITON_INTERPRET=1 (the CPU interpreter). The interpreter computes bf16
  `tl.dot` and bf16 elementwise math wrongly (environment.md), so kernels take it as a constexpr
  and upcast to fp32 before such math there; real GPUs keep bf16 operands for the tensor cores.
- compile_for(): builds a kernel for a real GPU architecture without a GPU (PTX + cubin) and
  reports its shared memory, so CI catches compile errors and shared-memory overflow for sm_90 and
  sm_89 on a CPU-only machine.
- ptxas_usage(), main_loop(), ptx_checks(): what the compiled code does, read from its PTX:
  registers and local-memory spills (ptxas -v), the hottest loop's text (its tensor-core
  instructions), integer division and local-memory instructions. compile_report(details=True)
  adds them to each row.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest shared memory one block may use (opt-in dynamic shared memory), bytes.
SHARED_MEMORY_LIMIT = {90: 232448, 89: 101376, 80: 166912}


def compile_for(kernel, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                num_stages: int = 3, divisible: tuple = ()):
    """Compile `kernel` (a @triton.jit function) for sm_<arch>. signature maps every argument to
    its Triton type ("*bf16", "i32", "fp32", or "constexpr"); constexprs gives the constexpr
    values; divisible names the arguments (pointers, strides) known to be multiples of 16, as
    the JIT specializes them at launch (it is what lets loads be vectorised). Returns the
    compiled kernel (`.metadata.shared`, `.asm["ptx"]`, ...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or None)
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


def _compile_row(module_name: str, index: int, arch: int, details: bool,
                 toolkit_ptxas: tuple = ()) -> dict:
    import contextlib
    import importlib
    import io

    from triton import knobs

    case = importlib.import_module(module_name).COMPILE_CASES[index]
    log = io.StringIO()
    with contextlib.ExitStack() as stack:
        if details:   # a fresh build (no cache hit) whose own `ptxas -v` log is kept
            stack.enter_context(knobs.compilation.scope())
            stack.enter_context(knobs.nvidia.scope())
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            stack.enter_context(contextlib.redirect_stdout(log))
        k = compile_for(case["kernel"], case["signature"], case["constexprs"], arch,
                        case["num_warps"], case.get("num_stages", 3), case.get("divisible", ()))
    row = {"name": case["name"], "arch": arch, "shared": k.metadata.shared,
           "limit": SHARED_MEMORY_LIMIT[arch], "wgmma": "wgmma" in k.asm["ptx"],
           "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", k.asm["ptx"]))}
    if details:
        row.update(ptx_checks(k.asm["ptx"], arch, ptxas_log=log.getvalue()))
    if case["name"] in toolkit_ptxas:
        row["toolkit_ptxas"] = ptxas_usage(k.asm["ptx"], arch)
    return row


def compile_report(module_name: str, archs: list, details: bool = False, jobs: int = 1,
                   toolkit_ptxas: tuple = ()) -> list:
    """Compile every entry of `<module>.COMPILE_CASES` (dicts: name, kernel, signature,
    constexprs, num_warps[, num_stages, archs]) for each arch (of `archs` that the case lists);
    returns rows for a JSON report. details=True builds afresh (no cache) and adds ptx_checks()
    with the resource usage from the `ptxas -v` log of that build (the ptxas Triton runs, so the
    cubin a GPU would load); the cases named in toolkit_ptxas also get `ptxas -v` of the CUDA
    toolkit (ptxas_usage) as "toolkit_ptxas"; jobs > 1 compiles in that many worker processes.
    Must run without TRITON_INTERPRET (there @triton.jit yields interpreter functions)."""
    import importlib

    if INTERPRET:
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset")
    cases = importlib.import_module(module_name).COMPILE_CASES
    work = [(module_name, i, arch, details, tuple(toolkit_ptxas)) for i, case in enumerate(cases)
            for arch in archs if arch in case.get("archs", archs)]
    if jobs <= 1:
        return [_compile_row(*w) for w in work]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_row, *zip(*work)))


# ---------------------------------------------------------------------------------------------
# Reading compiled code (CPU only: ptxas from the CUDA toolkit, or the one Triton ships)
# ---------------------------------------------------------------------------------------------
def _ptxas() -> str:
    """The toolkit's ptxas if on PATH, else the copy bundled with Triton."""
    found = shutil.which("ptxas")
    if found:
        return found
    from triton import knobs
    return knobs.nvidia.ptxas.path


def parse_ptxas_log(log: str) -> dict:
    """Registers per thread, spill stores/loads and stack frame bytes from a `ptxas -v` log."""
    def grab(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"ptxas -v output without {pattern!r}:\n{log[-2000:]}")
        return int(m.group(1))
    return {"registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"),
            "stack": grab(r"(\d+) bytes stack frame")}


def ptxas_usage(ptx: str, arch: int = 90, ptxas: str | None = None) -> dict:
    """Run `ptxas -v -arch=sm_<arch>(a)` (the CUDA toolkit's by default, else Triton's) on PTX
    and parse its resource line (parse_ptxas_log), plus the ptxas version."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    exe = ptxas or _ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([exe, "-v", f"-arch={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", version)
    return {**parse_ptxas_log(proc.stdout + proc.stderr), "ptxas": m.group(1) if m else "?"}


# A block label and the comment lines after it; LLVM marks loop headers there.
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):([^\n]*\n(?:[ \t]*//[^\n]*\n)*)", re.MULTILINE)


def loops(ptx: str) -> list:
    """The text of every loop in LLVM-emitted PTX: from a block marked `Loop Header` to the last
    branch back to it."""
    out = []
    for m in _LABEL.finditer(ptx):
        if "Loop Header" not in m.group(2):
            continue
        label = m.group(1)
        back = [b.end() for b in re.finditer(rf"bra(\.uni)?\s+{re.escape(label)};", ptx)
                if b.start() > m.start()]
        if back:
            out.append(ptx[m.start():back[-1]])
    return out


def main_loop(ptx: str, marker: str = "mma") -> str:
    """The loop with the most `marker` instructions (tensor-core MMAs by default): an attention
    kernel's key loop, a GEMM's K loop. Empty if no loop has one."""
    best = max(loops(ptx), key=lambda body: body.count(marker), default="")
    return best if marker in best else ""


_INT_DIV = re.compile(r"\b(div|rem)\.(s|u)(16|32|64)\b")
_LOCAL = re.compile(r"\b(ld|st)\.local\b")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.(\w+)\.(\w+)")


def ptx_checks(ptx: str, arch: int = 90, ptxas_log: str | None = None) -> dict:
    """What the compiled code does: registers and spills (from `ptxas_log`, the -v output of the
    build, or a ptxas_usage() run), integer divisions/remainders and local-memory instructions
    anywhere in the kernel, the tensor-core instructions of the main loop (wgmma operand types,
    e.g. ["bf16.bf16"]; mma.sync counts the pre-Hopper instruction), and float divisions in it."""
    loop = main_loop(ptx)
    usage = parse_ptxas_log(ptxas_log) if ptxas_log else ptxas_usage(ptx, arch)
    return {**usage,
            "int_div": len(_INT_DIV.findall(ptx)),
            "local_insts": len(_LOCAL.findall(ptx)),
            "loop_found": bool(loop),
            "loop_wgmma": sorted({f"{a}.{b}" for a, b in _WGMMA.findall(loop)}),
            "loop_wgmma_count": len(_WGMMA.findall(loop)),
            "loop_mma_sync": loop.count("mma.sync"),
            "loop_float_div": len(re.findall(r"\bdiv\.(rn|full|approx)\.f32\b", loop))}
