"""pytest-benchmark timings of generate and train_step per engine (run by `make perf`).

Timings never decide pass/fail in the test suite; here pytest-benchmark records them, and
`--benchmark-compare-fail` gates them against a saved run (see README, "Gating in CI").
"""
from __future__ import annotations

import os

import pytest
import torch

import engines
from core.data import synthetic_prompts
from core.models import build_bundle
from core.step import add_advantages
from core.types import GenerationConfig, RunConfig

PRESET = os.environ.get("RLHF_BENCH_PERF_PRESET", "tiny-opt")
ENGINES = ["hf", "hybrid", "hybrid-packed"]
B, P, G = 4, 32, 32


@pytest.fixture(scope="module", params=ENGINES)
def setup(request):
    bundle = build_bundle(PRESET, seed=0)
    cfg = RunConfig(preset=PRESET, batch=B, prompt_len=P, gen=GenerationConfig(gen_len=G))
    engine = engines.get(request.param)
    state = engine.init(bundle, cfg, seed=0)
    prompts = synthetic_prompts(B, P, bundle.config.vocab_size, bundle.pad_id, seed=0)
    return engine, state, prompts, cfg


def test_generate(benchmark, setup):
    engine, state, prompts, cfg = setup
    benchmark.group = f"generate {PRESET} B{B} P{P} G{G}"
    benchmark.pedantic(lambda: engine.generate(state, prompts, cfg.gen, seed=0),
                       rounds=5, iterations=1, warmup_rounds=1)


def test_train_step(benchmark, setup):
    engine, state, prompts, cfg = setup
    benchmark.group = f"train_step {PRESET} B{B} P{P} G{G}"
    exp = add_advantages(engine.score(state, engine.generate(state, prompts, cfg.gen, seed=0)),
                         cfg.ppo)
    holder = [state]

    def step():
        holder[0], _ = engine.train_step(holder[0], exp, cfg.ppo, seed=0)

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(torch.as_tensor(float(holder[0].step)))
