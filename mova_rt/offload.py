"""Offload: weights that live in host memory and visit the GPU when they compute.

`--offload group` (layerwise streaming, the reference's name for its leaf-level group offload):
the repeated blocks of every large tower (video and audio DiT blocks, bridge conditioners, UMT5
encoder blocks) keep their weights in pinned host memory; everything else stays on the GPU. A
BlockStreamer owns a ring of `depth + 1` GPU slots, each one block's worth of bytes. A dedicated
copy stream loads the next `depth` blocks (in the order the blocks ran in the previous forward)
while the current one computes; CUDA events order the copy into a slot after the compute that
last read it, and the compute after the copy: no device-wide synchronisation. With batched
guidance each weight crosses PCIe once per step.

`--offload cpu` (component residency): whole components move to the GPU when used; the video
experts take turns (the first is evicted, or freed with --remove_video_dit, at the switch).

On a CPU-only machine the same code runs with host and "device" both the CPU and no copy stream
(the copies are plain copies), so offload on equals offload off bit for bit in the tests.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn

from .errors import MovaInputError

MODES = ("none", "cpu", "group")
ALIGN = 256          # bytes: every parameter view in a slot starts on an aligned offset


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _Slot:
    def __init__(self, nbytes: int, device: torch.device, staging: bool):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.block = None                        # the module whose weights it holds
        cuda = device.type == "cuda"
        self.ready = torch.cuda.Event() if cuda else None    # its copy finished
        self.free = torch.cuda.Event() if cuda else None     # its last reader finished
        # Blocks read from disk land in a pinned staging buffer first (one per slot: the pool
        # is bounded by the ring), then cross PCIe in one copy.
        self.staging = (torch.empty(nbytes, dtype=torch.uint8).pin_memory()
                        if cuda and staging else None)
        self.staged = torch.cuda.Event() if self.staging is not None else None
        self.future = None                       # the disk read in flight (GPU only)


class BlockStreamer:
    """Streams the parameters of `blocks` (modules of any shapes) through GPU slots, from pinned
    host copies or, for parameters listed in `disk` (param -> loader.TensorLocation, params
    left on the meta device by the loader), from the checkpoint files: read with pread into a
    pinned staging buffer by a worker thread, so host RAM holds no streamed weight (the OS page
    cache, which is not the process's memory, serves repeated reads)."""

    def __init__(self, blocks: list, device, depth: int = 1, disk: dict | None = None):
        self.device = torch.device(device)
        self.depth = max(1, int(depth))
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blocks = list(blocks)
        disk = disk or {}
        self.disk_blocks: set = set()
        self.layout = {}                         # block -> [(param, offset, host tensor | location)]
        size = 0
        for block in self.blocks:
            entries, off = [], 0
            for mod in block.modules():
                for pname, p in list(mod._parameters.items()):
                    if p is None:
                        continue
                    if p in disk:
                        # The loader left it on meta; a meta Parameter cannot take real data,
                        # so an empty host Parameter takes its place until the slot binds it.
                        src, nbytes = disk[p], disk[p].nbytes
                        dtype, shape = src.dtype, tuple(src.shape)     # as stored (checked)
                        self.disk_blocks.add(block)
                        q = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
                        mod._parameters[pname] = q
                    else:
                        q, src = p, p.detach().to("cpu").contiguous()
                        if self.cuda:
                            src = src.pin_memory()
                        nbytes = src.numel() * src.element_size()
                        dtype, shape = src.dtype, tuple(src.shape)
                        q.data = src             # the weights now live on the host
                    entries.append((q, off, src, dtype, shape))
                    off = _align(off + nbytes)
            self.layout[block] = entries
            size = max(size, off)
        self.slot_bytes = size
        self.slots = [_Slot(size, self.device, staging=bool(self.disk_blocks))
                      for _ in range(self.depth + 1)]
        self._fds: dict = {}
        self._reader = None
        if self.cuda and self.disk_blocks:
            from concurrent.futures import ThreadPoolExecutor
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mova-rt-disk")
        self.order: list = []                    # blocks in the order the last forward ran them
        self._index: dict = {}
        self._recording: list = []
        self._seen: set = set()
        self._next = 0                           # ring position of the next slot to fill
        self.loads = 0                           # block loads (tests and the run summary)
        self.handles = []
        for block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._before))
            self.handles.append(block.register_forward_hook(self._after))
            block._mova_streamer = self          # for materialized(): calls outside forward

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for e in self.layout.values()
                   for _, _, h, _, _ in e if isinstance(h, torch.Tensor))

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    # -- loading -------------------------------------------------------------------------------
    def _slot_of(self, block):
        return next((s for s in self.slots if s.block is block), None)

    def _load(self, block, protect=()) -> _Slot:
        """Copy `block` into the next slot of the ring whose block is not in `protect` (the one
        computing and those about to), on the copy stream."""
        n = len(self.slots)
        for k in range(n):
            j = (self._next + k) % n
            if self.slots[j].block not in protect:
                break
        slot = self.slots[j]
        self._next = (j + 1) % n
        slot.block = block
        self.loads += 1
        if block in self.disk_blocks:
            if self._reader is not None:         # GPU: read and copy off the compute thread
                slot.future = self._reader.submit(self._disk_to_slot, block, slot)
            else:
                self._read(block, slot.buffer)
            return slot
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)   # its previous reader is done
                self._copy(block, slot)
                slot.ready.record(self.copy_stream)
        else:
            self._copy(block, slot)
        return slot

    def _read(self, block, buffer: torch.Tensor):
        """pread the block's tensors from the checkpoint files into `buffer` (host, uint8)."""
        raw = buffer.numpy()
        for p, off, loc, _, _ in self.layout[block]:
            fd = self._fds.get(loc.path)
            if fd is None:
                fd = self._fds[loc.path] = os.open(loc.path, os.O_RDONLY)
            got = 0
            while got < loc.nbytes:
                n = os.preadv(fd, [raw[off + got:off + loc.nbytes]], loc.offset + got)
                if n <= 0:
                    raise MovaInputError(f"{loc.path} ended early while streaming a block: the "
                                         "checkpoint file is truncated; download it again")
                got += n

    def _disk_to_slot(self, block, slot):
        """Worker thread: disk -> pinned staging -> (copy stream) slot, ordered by events."""
        if slot.staged is not None:
            slot.staged.synchronize()            # the staging buffer's previous copy is done
        self._read(block, slot.staging)
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slot.free)
            slot.buffer.copy_(slot.staging, non_blocking=True)
            slot.ready.record(self.copy_stream)
            slot.staged.record(self.copy_stream)

    def _copy(self, block, slot):
        for p, off, host, _, _ in self.layout[block]:
            n = host.numel() * host.element_size()
            view = slot.buffer[off:off + n].view(host.dtype).view(host.shape)
            view.copy_(host, non_blocking=self.cuda)

    def _bind(self, block, slot):
        for p, off, _, dtype, shape in self.layout[block]:
            n = math.prod(shape) * dtype.itemsize
            p.data = slot.buffer[off:off + n].view(dtype).view(shape)

    # -- hooks ---------------------------------------------------------------------------------
    def _before(self, block, args):
        # A block seen again starts a new forward: the previous one's order drives prefetching.
        if block in self._seen:
            self.order, self._recording = self._recording, []
            self._index = {b: k for k, b in enumerate(self.order)}
            self._seen = set()
        self._recording.append(block)
        self._seen.add(block)
        # What ran after this block last time, up to `depth` ahead: prefetched now.
        k = self._index.get(block)
        ahead = self.order[k + 1:k + 1 + self.depth] if k is not None else []
        slot = self._slot_of(block) or self._load(block, protect=set(ahead))
        if slot.future is not None:
            slot.future.result()                 # the read was queued; its copy is on the stream
            slot.future = None
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._bind(block, slot)
        for nxt in ahead:
            if self._slot_of(nxt) is None:
                self._load(nxt, protect={block, *ahead})

    def _after(self, block, args, out):
        slot = self._slot_of(block)
        if self.cuda and slot is not None:
            slot.free.record(torch.cuda.current_stream(self.device))
        for p, _, src, dtype, _ in self.layout[block]:
            # Never read a slot after it may be refilled: back to the host copy (or empty).
            p.data = src if isinstance(src, torch.Tensor) else torch.empty(0, dtype=dtype)

    def bind(self, block):
        """Load and bind one block outside its forward (no prefetch, order not recorded)."""
        slot = self._slot_of(block) or self._load(block, protect=set())
        if slot.future is not None:
            slot.future.result()
            slot.future = None
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._bind(block, slot)

    def remove(self):
        for h in self.handles:
            h.remove()
        if self._reader is not None:
            self._reader.shutdown()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


@contextmanager
def materialized(block: nn.Module):
    """The block's weights usable inside the context even when it streams (a call that is not
    its forward, e.g. the text K/V computed once per request); a no-op otherwise."""
    streamer = getattr(block, "_mova_streamer", None)
    if streamer is None:
        yield block
        return
    streamer.bind(block)
    try:
        yield block
    finally:
        streamer._after(block, (), None)


def tower_blocks(*dits, bridge=None) -> list:
    """The repeated blocks of DiT towers and the bridge's conditioners (None entries skipped)."""
    blocks = [b for dit in dits if dit is not None for b in dit.blocks]
    if bridge is not None:
        blocks += list(bridge.audio_to_video_conditioners.values())
        blocks += list(bridge.video_to_audio_conditioners.values())
    return blocks


def streamed_blocks(pipe) -> list:
    """The repeated blocks that stream under --offload group, per component."""
    return (tower_blocks(pipe.video_dit, pipe.video_dit_2, pipe.audio_dit, bridge=pipe.bridge)
            + list(pipe.text_encoder.model.encoder.block))        # UMT5-XXL: 24 blocks


def stream_modules(modules, blocks: list, device, depth: int = 1,
                   disk: dict | None = None) -> BlockStreamer:
    """`blocks` through a BlockStreamer; every other parameter and buffer of `modules` moves to
    `device` and stays there."""
    device = torch.device(device)
    streamer = BlockStreamer(blocks, device, depth, disk)
    streamed = {id(p) for b in blocks for p in b.parameters()}
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in streamed:
                p.data = p.data.to(device)
        for b in module.buffers():
            b.data = b.data.to(device)
    return streamer


# Checkpoint key prefixes of the streamed blocks, per component (spec 2.3).
BLOCK_PREFIXES = {"video_dit": ("blocks.",), "video_dit_2": ("blocks.",), "audio_dit": ("blocks.",),
                  "dual_tower_bridge": ("audio_to_video_conditioners.",
                                        "video_to_audio_conditioners."),
                  "text_encoder": ("encoder.block.",)}


def is_block_key(component: str, key: str) -> bool:
    return key.startswith(BLOCK_PREFIXES.get(component, ()))


def disk_sources(pipe, ckpt: str, dtype: torch.dtype) -> dict:
    """param -> TensorLocation for every streamed block parameter the loader left on meta."""
    from .loader import tensor_locations
    modules = {"video_dit": pipe.video_dit, "video_dit_2": pipe.video_dit_2,
               "audio_dit": pipe.audio_dit, "dual_tower_bridge": pipe.bridge,
               "text_encoder": pipe.text_encoder.model}
    out = {}
    for name, module in modules.items():
        locs = tensor_locations(ckpt, name)
        for key, p in module.named_parameters():
            if not is_block_key(name, key):
                continue
            loc = locs[key]
            if loc.dtype != dtype:
                raise MovaInputError(f"--stream_from_disk reads weights as stored: {name}/{key} "
                                     f"is {loc.dtype} on disk but the run is {dtype}; use "
                                     "--dtype bf16 (as MOVA stores them) or drop the flag")
            out[p] = loc
    return out


def apply_group(pipe, device, depth: int = 1, disk: dict | None = None) -> BlockStreamer:
    """Layerwise streaming: blocks through the streamer (from host copies, or from disk for the
    parameters in `disk`), everything else resident on `device`."""
    return stream_modules((pipe.video_dit, pipe.video_dit_2, pipe.audio_dit, pipe.bridge,
                           pipe.text_encoder.model, pipe.video_vae, pipe.audio_vae),
                          streamed_blocks(pipe), device, depth, disk)


def weight_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


class ComponentResidency:
    """--offload cpu: a component's weights stay in (pinned) host memory and move to the GPU as a
    whole while it is used; evicting is free (the host copy is kept, nothing is copied back).
    prefetch() starts a component's copy on a side stream (the second expert, during the last
    high-noise steps) so that load() at the switch only waits for what is left of it."""

    def __init__(self, device, prefetch_steps: int = 2):
        self.device = torch.device(device)
        self.prefetch_steps = prefetch_steps
        self.host: dict = {}                     # module -> [(param, host tensor)]
        self.pending: dict = {}                  # module -> (device tensors, ready event)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def register(self, module: nn.Module):
        entries = []
        for p in module.parameters():
            host = p.detach().to("cpu").contiguous()
            if self.device.type == "cuda":
                host = host.pin_memory()
            p.data = host
            entries.append((p, host))
        self.host[module] = entries

    def prefetch(self, module: nn.Module):
        if module in self.pending or module not in self.host:
            return
        ready = None
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                tensors = [h.to(self.device, non_blocking=True) for _, h in self.host[module]]
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        else:
            tensors = [h.to(self.device) for _, h in self.host[module]]
        self.pending[module] = (tensors, ready)

    def load(self, module: nn.Module):
        if module in self.pending:
            tensors, ready = self.pending.pop(module)
            if ready is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(ready)
                for t in tensors:        # allocated on the copy stream, now used on this one
                    t.record_stream(cur)
            for (p, _), t in zip(self.host[module], tensors):
                p.data = t
            return
        for p, host in self.host.get(module, ()):
            p.data = host.to(self.device, non_blocking=True)

    def evict(self, module: nn.Module, forget: bool = False):
        for p, host in self.host.get(module, ()):
            p.data = host
        if forget:                               # --remove_video_dit: drop the host copy too
            self.host.pop(module, None)


def apply_component(pipe, device) -> ComponentResidency:
    """The video experts and the text encoder visit the GPU in turn; the audio DiT, the bridge
    and the VAEs stay on it."""
    res = ComponentResidency(device)
    for module in (pipe.video_dit, pipe.video_dit_2, pipe.text_encoder.model):
        res.register(module)
    for module in (pipe.audio_dit, pipe.bridge, pipe.video_vae, pipe.audio_vae):
        module.to(device)
    return res


# ---------------------------------------------------------------------------------------------
# Choosing a plan for a VRAM budget
# ---------------------------------------------------------------------------------------------
GIB = 1024 ** 3
CONTEXT_GIB = 0.6            # CUDA context + cuBLAS workspaces + allocator slack (measured order)


def plan_estimates(weights: dict, activation_gib: float, batch: int) -> dict:
    """GiB each plan needs. weights: component -> bytes (video_dit, video_dit_2, audio_dit,
    dual_tower_bridge, text_encoder, video_vae, audio_vae, plus the streamed share of each in
    `<name>_blocks` and the largest block in `max_block`); activation_gib: one forward at batch 1
    (the meta-device plan's estimate), scaled by the guidance batch."""
    act = activation_gib * batch + CONTEXT_GIB
    vaes = weights["video_vae"] + weights["audio_vae"]
    every = sum(weights[k] for k in ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge",
                                     "text_encoder")) + vaes
    active = weights["video_dit"] + weights["audio_dit"] + weights["dual_tower_bridge"]
    # --offload cpu prefetches the second expert during the last high-noise steps: both on the GPU.
    component = max(active + weights["video_dit_2"], weights["text_encoder"]) + vaes
    resident = every - sum(weights[k] for k in weights if k.endswith("_blocks"))
    group = resident + 2 * weights["max_block"]
    return {"none": every / GIB + act, "cpu": component / GIB + act, "group": group / GIB + act}


def choose_plan(estimates: dict, budget_gib: float) -> str | None:
    """The least offload that fits the budget, or None."""
    for mode in ("none", "cpu", "group"):
        if estimates[mode] <= budget_gib:
            return mode
    return None


def component_weights(cfg) -> dict:
    """Bytes of every component's weights at run time (bf16, the DAC in fp32), built on the meta
    device, with the streamed (block) share of each and the largest block."""
    from .models.audio_dit import AudioDiT
    from .models.audio_vae import DacVAE
    from .models.bridge import Bridge
    from .models.text_encoder import build_umt5_encoder
    from .models.video_dit import VideoDiT
    from .ops import resolve

    ops = resolve("reference")
    with torch.device("meta"):
        video, audio, bridge = VideoDiT(cfg.video_dit, ops), AudioDiT(cfg.audio_dit, ops), \
            Bridge(cfg.bridge, ops)
        dac = DacVAE(cfg.audio_vae)
    text = build_umt5_encoder(cfg.text_encoder)

    def params(m, nbytes=2):
        return sum(p.numel() for p in m.parameters()) * nbytes

    blocks = {"video_dit": list(video.blocks), "audio_dit": list(audio.blocks),
              "dual_tower_bridge": list(bridge.audio_to_video_conditioners.values())
              + list(bridge.video_to_audio_conditioners.values()),
              "text_encoder": list(text.encoder.block)}
    out = {"video_dit": params(video), "video_dit_2": params(video), "audio_dit": params(audio),
           "dual_tower_bridge": params(bridge), "text_encoder": params(text),
           "video_vae": 130_000_000 * 2,       # Wan2.1 VAE, about 127 M parameters (spec 1.6)
           "audio_vae": params(dac, 4)}
    for name, bl in blocks.items():
        out[f"{name}_blocks"] = sum(params(b) for b in bl)
    out["video_dit_2_blocks"] = out["video_dit_blocks"]
    out["max_block"] = max(params(b) for bl in blocks.values() for b in bl)
    return out
