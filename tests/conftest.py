"""Shared fixtures: tiny model bundles, a small run config, prompts that fit them."""
from __future__ import annotations

import socket

import pytest
import torch

from core.data import synthetic_prompts
from core.models import build_bundle
from core.types import GenerationConfig, PPOConfig, RunConfig

# Tiny models on a shared 2-core machine: one intra-op thread is ~30x faster than two
# (OpenMP threads spin against the other workers' processes), and results stay deterministic.
torch.set_num_threads(1)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: models and tokenizers load locally."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def make_bundle(preset: str = "tiny-opt", seed: int = 0, **kw):
    """A fresh four-model bundle (actor, ref, critic, reward), fp32 on CPU."""
    return build_bundle(preset, seed=seed, **kw)


def make_cfg(**kw) -> RunConfig:
    """A small run: 4 prompts of 8 tokens, 6-token sampled answers, DeepSpeed-Chat PPO defaults.

    `gen=` and `ppo=` may be dicts of overrides for GenerationConfig / PPOConfig.
    """
    gen = kw.pop("gen", {})
    ppo = kw.pop("ppo", {})
    base = dict(preset="tiny-opt", batch=4, prompt_len=8)
    base.update(kw)
    return RunConfig(gen=gen if isinstance(gen, GenerationConfig) else
                     GenerationConfig(**{"gen_len": 6, **gen}),
                     ppo=ppo if isinstance(ppo, PPOConfig) else PPOConfig(**ppo), **base)


def make_prompts(bundle, cfg: RunConfig, seed: int):
    return synthetic_prompts(cfg.batch, cfg.prompt_len, bundle.config.vocab_size, bundle.pad_id,
                             seed=seed)


def lockstep(e1, s1, e2, s2, bundle, cfg: RunConfig, steps: int, label: str = ""):
    """Run two engines through the same PPO steps (same prompts and seeds); at every step their
    sampled answers must be identical and their actor losses within 1e-5. Returns both states."""
    from core.step import ppo_step
    for step in range(steps):
        prompts = make_prompts(bundle, cfg, seed=step)
        r1 = e1.generate(s1, prompts, cfg.gen, seed=step)
        r2 = e2.generate(s2, prompts, cfg.gen, seed=step)
        assert torch.equal(r1.seq, r2.seq), f"{label} step {step}: generation diverged"
        s1, m1 = ppo_step(e1, s1, prompts, cfg, seed=step)
        s2, m2 = ppo_step(e2, s2, prompts, cfg, seed=step)
        assert abs(float(m1.actor_loss) - float(m2.actor_loss)) < 1e-5, f"{label} step {step}"
    return s1, s2


def record_sequences(engine) -> list:
    """Every sequence `engine.generate` returns from now on, appended to the returned list (an
    instance attribute shadows the method: ppo_step calls through it; `del engine.generate`
    ends it)."""
    seqs, generate = [], engine.generate

    def recording(*a, **kw):
        r = generate(*a, **kw)
        seqs.append(r.seq)
        return r
    engine.generate = recording
    return seqs


def params_of(module: torch.nn.Module) -> dict:
    """name -> detached clone of every parameter (a snapshot)."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture
def tiny_bundle():
    """Factory: tiny_bundle(preset="tiny-opt", seed=0) -> ModelBundle (fresh each call)."""
    return make_bundle


@pytest.fixture
def prompts_for():
    """Factory: prompts_for(bundle, cfg, seed) -> seeded synthetic Prompts of cfg's shape."""
    return make_prompts


@pytest.fixture
def small_cfg():
    """Factory: small_cfg(**overrides) -> RunConfig (see make_cfg)."""
    return make_cfg
