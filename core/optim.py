"""AdamW in the shape of optax: an (init, update) pair of pure functions over dicts of tensors.

Numerically the update follows torch.optim.AdamW (decoupled weight decay, bias correction
folded into the step size and the denominator), so the two agree to float32 rounding.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


class AdamState(NamedTuple):
    count: Tensor  # 0-d int64, steps taken
    mu: dict       # name -> first moment, float32, shaped like the param
    nu: dict       # name -> second moment, float32, shaped like the param
    master: Optional[dict] = None  # name -> float32 master weight, for bf16/fp16 params only


class GradientTransformation(NamedTuple):
    init: Callable[[dict], AdamState]
    update: Callable[[dict, AdamState, dict], tuple[dict, AdamState]]
    # the same step done in place on a donated state and the params (what engines use: the
    # pure form allocates new moments every step, ~2x the optimiser state in transient memory)
    update_: Optional[Callable[[dict, AdamState, dict], AdamState]] = None


def adamw(lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0) -> GradientTransformation:
    b1, b2 = betas

    def init(params: dict) -> AdamState:
        zeros = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        # low-precision params keep a float32 master copy: lr ~1e-5 updates vanish in bf16
        master = {k: p.detach().float().clone() for k, p in params.items()
                  if p.dtype != torch.float32} or None
        return AdamState(torch.zeros((), dtype=torch.int64),
                         zeros, {k: torch.zeros_like(z) for k, z in zeros.items()}, master)

    def update(grads: dict, state: AdamState, params: dict) -> tuple[dict, AdamState]:
        """Pure: returns (updates, new_state); the caller adds updates to params."""
        count = state.count + 1
        t = int(count)
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        updates, mu, nu, new_master = {}, {}, {}, {}
        for k, g in grads.items():
            g = g.float()
            m = torch.lerp(state.mu[k], g, 1.0 - b1)
            v = state.nu[k] * b2 + (1.0 - b2) * g * g
            denom = v.sqrt() / bc2_sqrt + eps
            has_master = state.master is not None and k in state.master
            p = state.master[k] if has_master else params[k].float()
            u = -step_size * (m / denom)
            if weight_decay:
                u = u - (lr * weight_decay) * p
            if has_master:
                new_master[k] = p + u
                u = new_master[k] - params[k].float()  # lands the param on round(master)
            updates[k], mu[k], nu[k] = u, m, v
        return updates, AdamState(count, mu, nu, new_master or None)

    @torch.no_grad()
    def update_(grads: dict, state: AdamState, params: dict) -> AdamState:
        """In place: moments, master copies and params move; `state` is donated."""
        count = state.count + 1
        t = int(count)
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        for k, g in grads.items():
            g = g.float()
            m, v = state.mu[k], state.nu[k]
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = v.sqrt().div_(bc2_sqrt).add_(eps)
            has_master = state.master is not None and k in state.master
            p = state.master[k] if has_master else params[k]
            if weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            p.addcdiv_(m, denom, value=-step_size)
            if has_master:
                params[k].copy_(p)
        return AdamState(count, state.mu, state.nu, state.master)

    return GradientTransformation(init, update, update_)


@torch.no_grad()
def apply_updates_(params: dict, updates: dict) -> None:
    """params[k] += updates[k], in place, so modules that hold these tensors see the change."""
    for k, u in updates.items():
        p = params[k]
        if p.dtype == u.dtype:
            p.add_(u)
        else:  # sum in float32, round once
            p.copy_(p.float().add_(u))


def global_norm(tree: dict) -> Tensor:
    if not tree:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                 for g in tree.values()]))
