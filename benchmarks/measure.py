"""Measuring instruments: device timers, memory samplers, per-tower timing hooks, the environment.

Timing: a region is synchronised before and after (the user-visible wall time of a step, as the
reference README measures it). Per-op and per-tower times use CUDA events on the GPU (no host
sync inside the region) and perf_counter on the CPU, where execution is synchronous anyway.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager

import torch

GIB = 1024 ** 3


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: list[float]) -> dict:
    """Median with min / max and the mean (and every sample, for the JSON)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "samples": list(values)}


class Stamp:
    """A point in the device's timeline: a CUDA event on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.t = time.perf_counter()

    def seconds_to(self, later: "Stamp") -> float:
        """Elapsed seconds; on the GPU call only after a synchronize."""
        if self.cuda:
            return self.event.elapsed_time(later.event) / 1000.0
        return later.t - self.t


def time_op(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds per call of fn() over reps calls, each bracketed by device stamps."""
    for _ in range(warmup):
        fn()
    sync(device)
    stamps = []
    for _ in range(reps):
        a = Stamp(device)
        fn()
        stamps.append((a, Stamp(device)))
    sync(device)
    return [a.seconds_to(b) for a, b in stamps]


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _nvml_used(device: torch.device) -> int:
    return torch.cuda.device_memory_used(device)          # NVML (needs pynvml / nvidia-ml-py)


def _cuda_used(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)         # the driver's view, as nvidia-smi's
    return total - free


@functools.lru_cache(maxsize=None)
def device_memory_reader(device: torch.device):
    """(reader, source name) of memory in use on the whole device: NVML when its Python binding
    is installed, else cudaMemGetInfo. Either includes the CUDA context and the caching
    allocator's reserved but unused blocks (what nvidia-smi shows)."""
    if device.type != "cuda":
        return (lambda d: 0), None
    try:
        _nvml_used(device)
        return _nvml_used, "nvml"
    except Exception:  # no pynvml, or NVML refuses in this VM: fall back to the runtime API
        return _cuda_used, "cudaMemGetInfo"


class PeakSampler:
    """Polls host RSS and device-wide memory in a thread while a region runs (the allocator's own
    peak comes from torch.cuda.max_memory_allocated, which needs no polling)."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.read_device, _ = device_memory_reader(device)
        self.peak_rss = self.peak_device = 0
        self._stop = threading.Event()
        self._thread = None

    def _poll(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self):
        self.peak_rss = max(self.peak_rss, rss_bytes())
        self.peak_device = max(self.peak_device, self.read_device(self.device))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sample()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peak_alloc = (torch.cuda.max_memory_allocated(self.device)
                           if self.device.type == "cuda" else 0)
        return False


# ---------------------------------------------------------------------------------------------
# Per-tower timing
# ---------------------------------------------------------------------------------------------
@contextmanager
def tower_timer(device: torch.device, towers: dict):
    """Stamps around every call of the given modules (towers: name -> list of modules). Yields a
    dict that, after the region and a sync, maps each tower to its summed seconds."""
    intervals: dict[str, list] = {name: [] for name in towers}
    handles = []

    def pre(name):
        def hook(module, args):
            intervals[name].append([Stamp(device), None])
        return hook

    def post(name):
        def hook(module, args, out):
            intervals[name][-1][1] = Stamp(device)
        return hook

    for name, modules in towers.items():
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    sync(device)
    for name, pairs in intervals.items():
        result[name] = sum(a.seconds_to(b) for a, b in pairs)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def git_commit() -> str:
    """The commit being measured: MOVA_RT_COMMIT when set (a working-tree copy without .git, as on
    the GPU machine), else `git rev-parse HEAD` (+ "-dirty" with uncommitted changes)."""
    env = os.environ.get("MOVA_RT_COMMIT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import mova_rt

    env = {"device_type": device.type, "python": platform.python_version(),
           "torch": torch.__version__, "mova_rt": mova_rt.__version__, "commit": git_commit(),
           "host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, gpu_memory_gib=round(p.total_memory / GIB, 2),
                   sm=f"sm_{p.major}{p.minor}", sm_count=p.multi_processor_count,
                   cuda=torch.version.cuda, driver=_driver_version(),
                   device_memory_source=device_memory_reader(device)[1])
    else:
        env.update(device_name=platform.processor() or platform.machine(), gpu_memory_gib=None,
                   driver=None, cuda=None)
    return env
