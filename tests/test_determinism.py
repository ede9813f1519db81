"""Determinism on CPU: the same seed gives bit-identical tokens, losses, rewards and weights.

Two runs per engine, each with fresh model bundles and a fresh engine, in one process. Every
engine tested here is bit-exact on CPU (one intra-op thread, see conftest; no compiled kernels:
hybrid's decode is eager torch, hybrid-packed's MKL-packed GEMMs are deterministic), so no
tolerance is needed. A future engine that is not bit-exact gets an entry in TOLERANCE with the
reason, and is compared with that absolute tolerance instead.
"""
from __future__ import annotations

import pytest
import torch

import engines
from core.engine import EngineUnavailable
from core.rng import fold_in
from core.step import ppo_step

from conftest import make_bundle, make_cfg, make_prompts, record_sequences

SEED, STEPS = 3, 2
TOLERANCE: dict[str, float] = {}  # engine -> atol, with the reason next to it
# Two generation batches and two minibatches: the seeded shuffle and both sampling seeds run.
CFG = make_cfg(ppo=dict(actor_lr=1e-3, critic_lr=1e-3, generation_batches=2, minibatches=2))


def run_once(name: str):
    bundle = make_bundle("tiny-opt", seed=SEED)
    eng = engines.get(name)
    try:
        state = eng.init(bundle, CFG, seed=SEED)
    except EngineUnavailable as e:
        pytest.skip(f"{name}: {e}")
    tokens, metrics = record_sequences(eng), []
    for step in range(STEPS):  # per-step seeds as in bench.worker
        prompts = [make_prompts(bundle, CFG, seed=fold_in(SEED, 100, step, i)) for i in range(2)]
        state, m = ppo_step(eng, state, prompts, CFG, seed=fold_in(SEED, step))
        metrics.append(m)
    eng.release()
    weights = {k: p.detach().clone() for k, p in bundle.actor.named_parameters()}
    weights.update({f"critic.{k}": p.detach().clone()
                    for k, p in bundle.critic.named_parameters()})
    return tokens, metrics, weights


@pytest.mark.parametrize("name", ["hf", "hybrid", "hybrid-packed"])
def test_same_seed_same_run(name):
    tok1, met1, w1 = run_once(name)
    tok2, met2, w2 = run_once(name)
    assert len(tok1) == len(tok2) == 2 * STEPS
    for a, b in zip(tok1, tok2):
        assert torch.equal(a, b)  # tokens are always exact: a flipped sample is a real change
    atol = TOLERANCE.get(name, 0.0)
    for m1, m2 in zip(met1, met2):  # losses, reward, KL, returns, gradient norms
        for field, x, y in zip(m1._fields, m1, m2):
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=field)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=atol, msg=k)
    # not vacuous: answers are sampled (seeded noise is in play) and the steps differ
    assert not CFG.gen.greedy and met1[0].reward != met1[1].reward


def test_step_noise_is_seeded_gumbel_on_its_device():
    from core.rng import step_noise
    g = step_noise(7, 3, (64, 4096))
    assert g.device.type == "cpu" and g.dtype == torch.float32
    assert torch.equal(g, step_noise(7, 3, (64, 4096)))
    assert not torch.equal(g, step_noise(7, 4, (64, 4096)))   # each step its own draw
    assert torch.equal(step_noise(7, 3, 5), step_noise(7, 3, (5,)))  # an int shape, as torch's
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6 (262k draws: se ~0.0025)
    assert abs(g.mean().item() - 0.5772) < 0.01
    assert abs(g.var().item() - torch.pi ** 2 / 6) < 0.03


def test_cpu_noise_samples_the_softmax():
    """Gumbel-max over counter-based CPU noise: token frequencies match softmax(logits) within
    5 standard errors, and the uniforms under it are spread as U(0, 1)."""
    from core.rng import counter_uniform, step_noise
    u = counter_uniform(5, 400_000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.003 and abs(u.var().item() - 1 / 12) < 0.001
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -3.0])
    n = 200_000
    tokens = (logits + step_noise(11, 0, (n, logits.numel()))).argmax(-1)
    freq = torch.bincount(tokens, minlength=logits.numel()).double() / n
    p = logits.softmax(-1).double()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
