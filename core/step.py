"""The engine-agnostic PPO step: generate, sync, score, advantages, train.

`ppo_step` times nothing; a caller that wants timings passes `phase`, a function that returns a
context manager for a phase name (the harness passes its timers).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from .engine import Engine
from .guards import check_finite
from .ppo import gae, kl_rewards, masked_mean
from .rng import fold_in, generator
from .types import Experience, Metrics, Prompts, RunConfig, TrainState

_NO_PHASE: Callable = lambda name: contextlib.nullcontext()  # noqa: E731


def add_advantages(exp: Experience, ppo) -> Experience:
    rewards = kl_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.answer_mask,
                         ppo.kl_coef, ppo.clip_reward)
    adv, ret = gae(rewards, exp.values, exp.answer_mask, ppo.gamma, ppo.lam)
    check_finite("advantages", rewards=rewards, advantages=adv, returns=ret)
    return exp._replace(advantages=adv, returns=ret)


def take(exp: Experience, idx: torch.Tensor) -> Experience:
    """Rows `idx` of every per-row tensor."""
    return Experience(*[x[idx] if isinstance(x, torch.Tensor) else x for x in exp])


def concat(exps: Sequence[Experience]) -> Experience:
    if len(exps) == 1:
        return exps[0]
    fields = []
    for xs in zip(*exps):
        fields.append(torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0])
    return Experience(*fields)


def split_rows(n: int, parts: int) -> list[slice]:
    if parts < 1 or parts > n:
        raise ValueError(f"cannot split {n} rows into {parts} parts")
    size = -(-n // parts)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def experience_stats(exp: Experience) -> dict:
    """Reward, KL and return means of an experience (for Metrics)."""
    m = exp.answer_mask
    return dict(reward=exp.scores.float().mean(),
                kl=masked_mean(exp.logprobs - exp.ref_logprobs, m),
                returns=masked_mean(exp.returns, m) if exp.returns is not None else torch.zeros(()))


def mean_metrics(ms: Sequence[Metrics]) -> Metrics:
    return Metrics(*[torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]).mean()
                     for xs in zip(*ms)])


def ppo_step(engine: Engine, state: TrainState, prompts: Prompts | Sequence[Prompts],
             cfg: RunConfig, *, seed: int, phase: Callable = _NO_PHASE
             ) -> tuple[TrainState, Metrics]:
    """One PPO step with DeepSpeed-Chat's experience buffer.

    `prompts` is one batch per generation batch (cfg.ppo.generation_batches of them). Every
    rollout is scored into the buffer; then ppo_epochs passes over seeded-shuffled minibatches,
    one train_step (one optimiser step, cfg.ppo.grad_accum micro-batches) per minibatch.
    """
    batches = [prompts] if isinstance(prompts, Prompts) else list(prompts)
    ppo = cfg.ppo
    if len(batches) != ppo.generation_batches:
        raise ValueError(f"ppo_step: {len(batches)} prompt batch(es) for "
                         f"generation_batches={ppo.generation_batches}; pass one per generation "
                         f"batch")
    # their experience is one buffer: rows must line up (other types: generate says what's wrong)
    shapes = sorted({tuple(p.input_ids.shape) for p in batches if isinstance(p, Prompts)})
    if len(shapes) > 1:
        listed = ", ".join(map(str, shapes))
        raise ValueError(f"ppo_step: the prompt batches differ in shape ({listed}); give every "
                         f"generation batch the same (B, P)")
    with phase("sync"):
        engine.sync(state)
    exps = []
    for i, p in enumerate(batches):
        with phase("generate"):
            rollout = engine.generate(state, p, cfg.gen, seed=fold_in(seed, 1, i))
        with phase("score"):
            exp = engine.score(state, rollout)
            check_finite("score", logprobs=exp.logprobs, ref_logprobs=exp.ref_logprobs,
                         values=exp.values, scores=exp.scores)
            exps.append(add_advantages(exp, ppo))
    buffer = concat(exps)
    n = buffer.seq.shape[0]
    metrics = []
    with phase("train"):
        for epoch in range(ppo.ppo_epochs):
            order = torch.randperm(n, generator=generator(fold_in(seed, 2, epoch)))
            if ppo.ppo_epochs == 1 and ppo.minibatches == 1:
                order = torch.arange(n)  # a single pass over the whole batch: keep row order
            for j, rows in enumerate(split_rows(n, ppo.minibatches)):
                state, m = engine.train_step(state, take(buffer, order[rows]), ppo,
                                             seed=fold_in(seed, 3, epoch, j))
                metrics.append(m)
    return state, mean_metrics(metrics)
