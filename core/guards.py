"""Numeric guards: stop a PPO step at the first non-finite loss, reward or gradient.

Called before any weight is touched, so the last good state stays as it was. Each check costs one
`isfinite(...).all()` per tensor group and a single host sync; which tensor is bad is only looked
up once something is known to be wrong.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A NaN or inf in `name` during `phase`. `step` may be filled in by the caller (the PPO
    step index is known to the harness, not to the step), so the message is built on demand."""

    def __init__(self, phase: str, name: str, step: Optional[int] = None):
        super().__init__(phase, name)
        self.phase, self.name, self.step = phase, name, step

    def __str__(self) -> str:
        at = "" if self.step is None else f" (step {self.step})"
        return f"non-finite {self.name} in phase {self.phase}{at}"


def _first_bad(tensors: dict) -> Optional[str]:
    for k, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            return k
    return None


def check_finite(phase: str, **tensors: Optional[Tensor]) -> None:
    """Raise NonFiniteError naming the first of `tensors` (None ones skipped) that holds a NaN
    or inf. All tensors must live on one device."""
    xs = {k: x for k, x in tensors.items() if x is not None}
    if not xs:
        return
    ok = torch.stack([torch.isfinite(x).all() for x in xs.values()]).all()
    if not bool(ok):  # the one host sync
        raise NonFiniteError(phase, _first_bad(xs))


def check_grads(phase: str, label: str, grads: dict, norm: Tensor) -> None:
    """Gradients `grads` (name -> tensor) with global norm `norm`, already computed for the
    metrics: any NaN/inf gradient makes the norm non-finite, so only then are they searched.
    A norm that overflowed from finite gradients is not an error (Adam takes those fine)."""
    if bool(torch.isfinite(norm)):
        return
    bad = _first_bad(grads)
    if bad is not None:
        raise NonFiniteError(phase, f"{label} {bad!r}")
