"""Step caching (approximate, opt-in `--cache`): reuse the DiT stack's residual on steps where the
computation is predicted to change little (the FirstBlockCache / EasyCache idea, calibration-free).

Every forward runs its first layer (bridge 0 + video block 0 + audio block 0). Its residual
r = (output - input) of both towers is compared with the one stored at the last fully computed
step: change = max over the towers of ||r - r_ref|| / ||r_ref||. On a computed step the rest of the
stack runs and its residual d = (stack output - first-layer output) is stored; on a reused step
the stack is skipped and the output is first-layer output + d, then the heads run as usual.

One decision per step for every guidance pass (consistency across CFG branches and both towers):
- `auto`: reuse when the first pass's change is below `threshold`;
- `schedule`: reuse on a fixed set of steps (every other step by default);
never on the first and last steps, on the first step of an expert (the switch drops the cache),
nor more than `max_reuse` steps in a row. Reusing is exact only if nothing changed: this is an
approximation, off by default, and its error against the exact run is measured in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("off", "auto", "schedule")


@dataclass
class StepCache:
    mode: str = "off"
    threshold: float = 0.1
    max_reuse: int = 2
    schedule: frozenset = frozenset()        # steps to reuse in `schedule` mode
    num_steps: int = 50
    computed: int = 0                        # forwards (passes) computed / reused
    reused: int = 0
    _entries: dict = field(default_factory=dict)
    _dit: object = None
    _step: int = -1
    _decision: bool | None = None
    _allowed: bool = False
    _run: int = 0                            # consecutive reused steps

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown cache mode {self.mode!r}: choose {', '.join(MODES)}")

    @classmethod
    def every_other(cls, num_steps: int, max_reuse: int = 1) -> "StepCache":
        return cls(mode="schedule", schedule=frozenset(range(2, num_steps - 1, 2)),
                   num_steps=num_steps, max_reuse=max_reuse)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def begin_step(self, i: int, dit) -> None:
        """Called once per step before its passes."""
        if dit is not self._dit:                 # a new expert: its residuals differ
            self._dit, self._entries = dit, {}
        self._step, self._decision = i, None
        self._allowed = (self.enabled and 0 < i < self.num_steps - 1 and bool(self._entries)
                         and self._run < self.max_reuse)
        if self.mode == "schedule":
            self._decision = self._allowed and i in self.schedule

    def end_step(self) -> None:
        self._run = self._run + 1 if self._decision else 0

    def after_first_layer(self, key, v_in, a_in, v0, a0):
        """Decide for this pass; returns the stored stack residuals (dv, da) to reuse, or None
        (then call store() with the stack output)."""
        entry = self._entries.get(key)
        if self._decision is None:               # auto: the step's first pass decides
            self._decision = False
            if self._allowed and entry is not None:
                self._decision = _change(entry["r_v"], v0 - v_in, entry["r_a"], a0 - a_in) \
                    < self.threshold
        if self._decision and entry is not None:
            self.reused += 1
            return entry["d_v"], entry["d_a"]
        self._pending = (key, v0 - v_in, a0 - a_in, v0, a0)
        return None

    def store(self, v_out, a_out) -> None:
        key, r_v, r_a, v0, a0 = self._pending
        self._entries[key] = {"r_v": r_v, "r_a": r_a, "d_v": v_out - v0, "d_a": a_out - a0}
        self.computed += 1


def _change(ref_v, r_v, ref_a, r_a) -> float:
    def rel(ref, r):
        return ((r.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    return max(rel(ref_v, r_v), rel(ref_a, r_a))


def cached_stack(cache: StepCache | None, key, v_in: torch.Tensor, a_in: torch.Tensor,
                 v0: torch.Tensor, a0: torch.Tensor):
    """The forward's hook after its first layer: (dv, da) to reuse, or None to compute."""
    if cache is None or not cache.enabled:
        return None
    return cache.after_first_layer(key, v_in, a_in, v0, a0)
