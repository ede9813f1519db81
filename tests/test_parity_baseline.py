"""The headline check: core.step.ppo_step on the hf engine == the imperative baseline.

Two bundles built from the same seed; one trained by core (torch.func grads, core AdamW, the
functional PPO math), the other by baselines/imperative_ppo.py (nn.Module calls,
loss.backward(), torch.optim.AdamW, its own loops). Greedy, fixed-length answers, fp32.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from baselines.imperative_ppo import ImperativePPO
from core.step import ppo_step
from core.types import GenerationConfig, PPOConfig, RunConfig
from engines.hf import HFEngine

STEPS, BATCH, PROMPT, ANSWER = 3, 4, 8, 6
# lr 3e-4: parameters move ~1e-3 in 3 steps, 100x the tolerance, so a wrong gradient shows.
# eps 1e-6 (on both sides): attention key biases have a gradient that is exactly 0 in exact
# arithmetic (softmax ignores a constant shift), so both sides see only float32 rounding noise
# (~1e-10) there, and Adam scales it to lr*g/(|g|+eps); with the default 1e-8 that noise alone
# moves those biases by up to ~1e-5 differently on the two sides. Real gradients are >> 1e-6.
LR, EPS = 3e-4, 1e-6


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama", "tiny-gpt2"])
def test_core_hf_step_equals_imperative_baseline(preset, tiny_bundle, prompts_for):
    ppo = PPOConfig(actor_lr=LR, critic_lr=LR, eps=EPS)  # DeepSpeed-Chat defaults otherwise
    cfg = RunConfig(preset=preset, batch=BATCH, prompt_len=PROMPT, reward="model",
                    gen=GenerationConfig(gen_len=ANSWER, greedy=True), ppo=ppo)
    core_b, base_b = tiny_bundle(preset, seed=0), tiny_bundle(preset, seed=0)
    start = {n: p.detach().clone() for n, p in core_b.actor.named_parameters()}

    engine = HFEngine()
    state = engine.init(core_b, cfg, seed=0)
    base = ImperativePPO(base_b.actor, base_b.ref, base_b.critic, base_b.reward,
                         pad_id=base_b.pad_id, kl_coef=ppo.kl_coef, clip_reward=ppo.clip_reward,
                         cliprange=ppo.cliprange, cliprange_value=ppo.cliprange_value,
                         gamma=ppo.gamma, lam=ppo.lam, actor_lr=ppo.actor_lr,
                         critic_lr=ppo.critic_lr, betas=ppo.betas, eps=ppo.eps,
                         weight_decay=ppo.weight_decay)

    for step in range(STEPS):
        prompts = prompts_for(core_b, cfg, seed=100 + step)  # left-padded, varied lengths
        rollout = engine.generate(state, prompts, cfg.gen, seed=step)  # greedy: what ppo_step sees
        state, m = ppo_step(engine, state, prompts, cfg, seed=step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the baseline calls float() on a grad-tracking loss
            b_actor, b_critic, b_seq = base.step(prompts.input_ids, prompts.attention_mask,
                                                 ANSWER)
        assert torch.equal(rollout.seq, b_seq), f"step {step}: greedy answers differ"
        assert abs(float(m.actor_loss) - b_actor) <= 1e-5, (step, float(m.actor_loss), b_actor)
        assert abs(float(m.critic_loss) - b_critic) <= 1e-5, (step, float(m.critic_loss), b_critic)

    for name, ours, theirs in (("actor", core_b.actor, base_b.actor),
                               ("critic", core_b.critic, base_b.critic)):
        theirs_p = dict(theirs.named_parameters())
        for n, p in ours.named_parameters():
            torch.testing.assert_close(p.detach(), theirs_p[n].detach(), atol=1e-5, rtol=0,
                                       msg=lambda s, n=n: f"{name} {n}: {s}")
    # the comparison is not vacuous: training moved the actor far beyond the tolerance
    moved = max(float((p.detach() - start[n]).abs().max())
                for n, p in core_b.actor.named_parameters())
    assert moved > 1e-4
    # the frozen models stayed put on both sides
    for a, b in ((core_b.ref, base_b.ref), (core_b.reward, base_b.reward)):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(start[n], p) for n, p in core_b.ref.named_parameters())
