"""Rooflines measured in the same run as the results they qualify.

- bf16 dense matmul, n^3 (2 n^3 FLOPs): the compute ceiling for GEMMs and attention.
- e4m3 dense matmul through torch._scaled_mm (GPUs of compute capability 8.9+): the ceiling of
  the fp8 GEMMs (ops whose backend name starts with "fp8").
- device-to-device copy of a large buffer: bytes read + bytes written per second, the ceiling of
  every memory-bound kernel (norms, modulation, RoPE, gates).
- pinned host-to-device copy: the ceiling for weight streaming (offload).
On the CPU the same measurements run small (a smoke test: the figures mean little there).
"""

from __future__ import annotations

import torch

from .measure import spread, time_op

FULL = {"matmul_n": 8192, "copy_bytes": 1 << 30, "h2d_bytes": 1 << 30, "reps": 20}
SMALL = {"matmul_n": 256, "copy_bytes": 8 << 20, "h2d_bytes": 8 << 20, "reps": 3}


def _summary(seconds: list[float], work: float, unit: str) -> dict:
    s = spread(seconds)
    rate = work / s["median"]
    return {"value": rate / (1e12 if unit == "TFLOP/s" else 1e9), "unit": unit,
            "median_ms": s["median"] * 1e3, "min_ms": s["min"] * 1e3, "max_ms": s["max"] * 1e3}


def matmul_ceiling(device: torch.device, n: int, reps: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sec = time_op(lambda: torch.mm(a, b, out=out), device, warmup=3, reps=reps)
    res = _summary(sec, 2.0 * n ** 3, "TFLOP/s")
    res.update(what=f"{str(dtype).removeprefix('torch.')} matmul {n}^3")
    return res


def fp8_matmul_ceiling(device: torch.device, n: int, reps: int) -> dict | None:
    """e4m3 x e4m3 -> bf16 through cuBLASLt with per-tensor scales; None where there is none."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    sec = time_op(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                           out_dtype=torch.bfloat16), device, warmup=3, reps=reps)
    res = _summary(sec, 2.0 * n ** 3, "TFLOP/s")
    res.update(what=f"e4m3 matmul {n}^3 (torch._scaled_mm)")
    return res


def copy_ceiling(device: torch.device, nbytes: int, reps: int) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    sec = time_op(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    res = _summary(sec, 2.0 * nbytes, "GB/s")   # read + write
    res.update(what=f"device copy {nbytes / 2 ** 20:.0f} MiB (read + write)")
    return res


def h2d_ceiling(device: torch.device, nbytes: int, reps: int) -> dict | None:
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory().fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    sec = time_op(lambda: dst.copy_(src, non_blocking=True), device, warmup=2, reps=reps)
    res = _summary(sec, float(nbytes), "GB/s")
    res.update(what=f"pinned host-to-device copy {nbytes / 2 ** 20:.0f} MiB")
    return res


def measure_ceilings(device: torch.device, full: bool) -> dict:
    p = FULL if full else SMALL
    out = {"matmul": matmul_ceiling(device, p["matmul_n"], p["reps"]),
           "copy_d2d": copy_ceiling(device, p["copy_bytes"], p["reps"])}
    fp8 = fp8_matmul_ceiling(device, p["matmul_n"], p["reps"])
    if fp8 is not None:
        out["matmul_fp8"] = fp8
    h2d = h2d_ceiling(device, p["h2d_bytes"], p["reps"])
    if h2d is not None:
        out["copy_h2d_pinned"] = h2d
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
