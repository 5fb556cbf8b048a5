"""Running under torchrun: this process's rank, the process group, the checks that every rank runs
the same job, and how a lost rank becomes a one-line error.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain launch has none of
them and runs as the single rank of a world of one. The process group is NCCL on GPUs and gloo on
CPUs, with a timeout on every collective (`--dist_timeout`):
- a rank that dies: torchrun stops the others on its node at once; ranks elsewhere see their next
  collective fail (gloo: the connection closes; NCCL: its watchdog aborts the process at the
  timeout);
- a rank that hangs: the others' next collective times out after `--dist_timeout` seconds;
- ranks launched with different flags or checkpoint files: found before any weight is loaded, by
  comparing a fingerprint of each rank's flags and files (`check_agreement`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MovaInputError

SAMPLE_BYTES = 1 << 16   # bytes read from each end of a weight file's data for its fingerprint


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env() -> Launch:
    """This process's place, from torchrun's environment (a world of one without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise MovaInputError("RANK / WORLD_SIZE / LOCAL_RANK are not integers: launch with "
                             "torchrun, which sets them") from None
    if world < 1 or not 0 <= rank < world:
        raise MovaInputError(f"RANK {rank} is not in a world of {world}: launch with torchrun")
    return Launch(rank, world, local)


def device_for(launch: Launch, requested: str | None) -> str:
    """Each rank's device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if not launch.distributed or not requested.startswith("cuda"):
        return requested
    if requested != "cuda":
        raise MovaInputError(f"--device {requested} under torchrun: pass --device cuda, each rank "
                             "takes cuda:LOCAL_RANK")
    if launch.local_rank >= torch.cuda.device_count():
        raise MovaInputError(f"LOCAL_RANK {launch.local_rank} but this node has "
                             f"{torch.cuda.device_count()} GPUs: lower --nproc_per_node")
    return f"cuda:{launch.local_rank}"


def init(launch: Launch, device: str, timeout_s: float) -> None:
    """Joins the process group (NCCL for CUDA devices, gloo otherwise)."""
    if not launch.distributed or dist.is_initialized():
        return
    if timeout_s <= 0:
        raise MovaInputError(f"--dist_timeout {timeout_s} must be positive (seconds)")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Agreement: every rank runs the same flags on the same files
# ---------------------------------------------------------------------------------------------
def checkpoint_fingerprint(path: str) -> dict:
    """{relative file: digest} of a checkpoint folder: config files whole, weight files by size,
    safetensors header and the first and last SAMPLE_BYTES of their data (cheap on 72 GB, and two
    different random or trained weight sets differ there)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            h = hashlib.sha256()
            size = os.path.getsize(full)
            h.update(str(size).encode())
            with open(full, "rb") as fh:
                if size <= 4 * SAMPLE_BYTES:
                    h.update(fh.read())
                else:
                    h.update(fh.read(2 * SAMPLE_BYTES))
                    fh.seek(size - SAMPLE_BYTES)
                    h.update(fh.read())
            out[rel] = h.hexdigest()[:16]
    return out


def fingerprint(flags: dict, ckpt: str) -> dict:
    from . import __version__
    return {"flags": flags, "checkpoint": checkpoint_fingerprint(ckpt),
            "versions": {"mova_rt": __version__, "torch": torch.__version__}}


def disagreement(prints: list) -> str | None:
    """The first difference between the ranks' fingerprints, in words, or None."""
    first = prints[0]
    for rank, other in enumerate(prints[1:], start=1):
        for flag in sorted(set(first["flags"]) | set(other["flags"])):
            a, b = first["flags"].get(flag), other["flags"].get(flag)
            if a != b:
                return (f"ranks disagree on --{flag} (rank 0: {a!r}, rank {rank}: {b!r}): launch "
                        "every rank with the same flags")
        ca, cb = first["checkpoint"], other["checkpoint"]
        if ca != cb:
            diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
            return (f"ranks 0 and {rank} read different checkpoint files ({len(diff)} differ, "
                    f"first {diff[0]}): give every node the same checkpoint")
        if first["versions"] != other["versions"]:
            return (f"ranks 0 and {rank} run different software ({first['versions']} vs "
                    f"{other['versions']}): install the same mova-rt and torch on every node")
    return None


def check_agreement(launch: Launch, flags: dict, ckpt: str) -> None:
    """Compares every rank's fingerprint (one all-gather); raises MovaInputError on all ranks."""
    if not launch.distributed:
        return
    prints = [None] * launch.world_size
    dist.all_gather_object(prints, fingerprint(flags, ckpt))
    problem = disagreement(prints)
    if problem:
        raise MovaInputError(problem)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------
def is_comm_failure(e: BaseException) -> bool:
    """An exception raised inside torch.distributed (a lost or hung peer, a timeout)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and f"torch{os.sep}distributed" in frames[-1].filename


def comm_failure_message(e: BaseException, timeout_s: float) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ("lost contact with the other ranks (" + first + "): another rank failed or hung "
            f"(collectives wait at most --dist_timeout {timeout_s:g} s); its own error says why")


def quiet_unless_writer(launch: Launch) -> None:
    """Notices and warnings from rank 0 only (the others would repeat them word for word)."""
    if launch.rank != 0:
        import warnings
        warnings.simplefilter("ignore")
        sys.stderr.flush()
