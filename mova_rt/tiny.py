"""The embedded tiny model: a random-weight `tiny` checkpoint written once (deterministically,
seed 0) into a cache folder and then loaded through the normal loader, so the demo exercises the
same code path as a real checkpoint. MOVA_RT_CACHE overrides the folder (default
~/.cache/mova-rt)."""

from __future__ import annotations

import os

from . import __version__
from .checkpoint import make_checkpoint
from .errors import MovaInputError

TINY_SEED = 0


def embedded_tiny_checkpoint() -> str:
    root = os.environ.get("MOVA_RT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "mova-rt")
    path = os.path.join(root, f"tiny-{__version__}-seed{TINY_SEED}")
    marker = os.path.join(path, "model_index.json")
    if not os.path.isfile(marker):
        try:
            make_checkpoint("tiny", path, seed=TINY_SEED)  # atomic: a complete folder or none
        except (MovaInputError, OSError):
            if not os.path.isfile(marker):   # not another process (a torchrun rank) winning
                raise
    return path
