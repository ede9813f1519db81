"""Pure seed arithmetic and noise drawn from seeds (never from global RNG state)."""
from __future__ import annotations

import math
from typing import Callable

import torch

_MASK = (1 << 64) - 1
# splitmix64's increment and multipliers (Steele, Lea and Flood, 2014)
_GAMMA, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z: int) -> int:
    # splitmix64 finaliser: a bijection with good avalanche, so nearby inputs give unrelated seeds
    z = (z + _GAMMA) & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
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


def as_int64(c: int) -> int:
    """c's low 64 bits, as torch's int64 (and C++'s int64_t) hold them."""
    c = int(c) & _MASK
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr_(z: torch.Tensor, s: int) -> torch.Tensor:  # z ^= z >>> s (logical shift)
    return z.bitwise_xor_((z >> s).bitwise_and_((1 << (64 - s)) - 1))


def counter_uniform(key: int, n: int) -> torch.Tensor:
    """n float32 uniforms in (0, 1) on the CPU; element i is a pure function of (key, i): the
    splitmix64 finaliser of key + (i + 1) * gamma, whose top 23 bits give an odd multiple of
    2^-24 (never 0 or 1). A counter-based draw: engines/kernels.counter_uniform computes the same
    bits in C++ on every core, where torch.rand's generator runs on one thread (1.7-3.2 ms for
    8 x 50k here). This torch form is the reference and the fallback (int64 products wrap)."""
    z = torch.arange(1, n + 1, dtype=torch.int64).mul_(as_int64(_GAMMA)).add_(as_int64(key))
    _lsr_(z, 30).mul_(as_int64(_M1))
    _lsr_(z, 27).mul_(as_int64(_M2))  # the finaliser's last step, z ^= z >>> 31, keeps the top bits
    return (z >> 41).bitwise_and_((1 << 23) - 1).mul_(2).add_(1).float().mul_(2.0 ** -24)


Uniform = Callable[[int, int], torch.Tensor]


def gumbel(seed: int, shape, device="cpu", dtype=torch.float32,
           uniform: Uniform = counter_uniform) -> torch.Tensor:
    """Gumbel(0, 1) noise; argmax(logits / T + gumbel) is a sample from softmax(logits / T).

    Drawn on `device`: on the CPU from `uniform`, counter_uniform or a function that gives its
    bits (the engines pass the C++ one, engines.kernels.counter_uniform); on a GPU with that
    device's own generator (a CPU draw plus its copy would cost more per token than a
    CUDA-graph decode step, and the copy would stall the host). CPU and CUDA give different
    noise for one seed; on one device every engine draws the same."""
    device = torch.device(device)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if device.type == "cpu":
        u = uniform(seed, math.prod(shape)).view(shape)
    else:
        u = torch.rand(shape, generator=generator(seed, device), dtype=torch.float32,
                       device=device)
    # in place: four fresh 1.6 MB tensors per token (batch 8 x 50k) cost as much as the draw
    return u.clamp_(min=1e-20, max=1.0 - 1e-7).log_().neg_().log_().neg_().to(dtype)


def step_noise(seed: int, t: int, shape, device="cpu",
               uniform: Uniform = counter_uniform) -> torch.Tensor:
    """Noise for decode step t (0-based answer position). Every engine draws it the same way."""
    return gumbel(fold_in(seed, t), shape, device=device, uniform=uniform)


def noisy_scores(scores: torch.Tensor, seed: int, t: int, temperature: float,
                 uniform: Uniform = counter_uniform) -> torch.Tensor:
    """fp32 scores / T + the Gumbel noise of step t: its argmax is step t's sample. Every
    engine samples through this, so equal logits give equal tokens."""
    s = scores.float()
    if temperature != 1.0:
        s = s / temperature
    return step_noise(seed, t, s.shape, device=s.device, uniform=uniform).add_(s)
