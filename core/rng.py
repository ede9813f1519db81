"""Pure seed arithmetic and noise drawn from seeds (never from global RNG state)."""
from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    # splitmix64 finaliser: a bijection with good avalanche, so nearby inputs give unrelated seeds
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def fold_in(seed: int, *data: int) -> int:
    """Derive a new seed from `seed` and any number of ints, like jax.random.fold_in."""
    z = _mix(int(seed) & _MASK)
    for d in data:
        z = _mix(z ^ (int(d) & _MASK))
    return z & ((1 << 63) - 1)


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def gumbel(seed: int, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gumbel(0, 1) noise; argmax(logits / T + gumbel) is a sample from softmax(logits / T).

    Drawn on `device` with that device's own generator: on a GPU, a CPU draw plus its copy
    would cost more per token than a CUDA-graph decode step, and the copy would stall the
    host. CPU and CUDA generators give different noise for one seed; on one device every
    engine draws the same."""
    device = torch.device(device)
    u = torch.rand(shape, generator=generator(seed, device), dtype=torch.float32, device=device)
    # in place: four fresh 1.6 MB tensors per token (batch 8 x 50k) cost as much as the draw
    return u.clamp_(min=1e-20, max=1.0 - 1e-7).log_().neg_().log_().neg_().to(dtype)


def step_noise(seed: int, t: int, shape, device="cpu") -> torch.Tensor:
    """Noise for decode step t (0-based answer position). Every engine draws it the same way."""
    return gumbel(fold_in(seed, t), shape, device=device)


def noisy_scores(scores: torch.Tensor, seed: int, t: int, temperature: float) -> torch.Tensor:
    """fp32 scores / T + the Gumbel noise of step t: its argmax is step t's sample. Every
    engine samples through this, so equal logits give equal tokens."""
    s = scores.float()
    if temperature != 1.0:
        s = s / temperature
    return step_noise(seed, t, s.shape, device=s.device).add_(s)
