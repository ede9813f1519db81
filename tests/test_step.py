"""The hf engine's functional training and the buffered core.step.ppo_step."""
from __future__ import annotations

import pytest
import torch

from core.ppo import gae, kl_rewards
from core.rng import fold_in
from core.step import add_advantages, ppo_step, take
from core.types import Experience, GenerationConfig
from engines import common
from engines.hf import HFEngine

BUFFERED = dict(generation_batches=2, minibatches=2, ppo_epochs=2, grad_accum=2,
                actor_lr=1e-3, critic_lr=1e-3)


def _engine(bundle, cfg):
    eng = HFEngine()
    return eng, eng.init(bundle, cfg, seed=0)


def _experience(eng, state, prompts, cfg, seed=1):
    return add_advantages(eng.score(state, eng.generate(state, prompts, cfg.gen, seed=seed)),
                          cfg.ppo)


# ----------------------------------------------------------------------------- grads

@pytest.fixture
def scored(tiny_bundle, small_cfg, prompts_for):
    """An experience on tiny-opt made interesting: ratios away from 1 (some clipped), advantages
    of both signs, answer masks of lengths 6, 4, 1, 0."""
    b, cfg = tiny_bundle("tiny-opt", seed=0), small_cfg()
    eng, state = _engine(b, cfg)
    exp = _experience(eng, state, prompts_for(b, cfg, seed=0), cfg)
    g = torch.Generator().manual_seed(5)
    B, G = exp.logprobs.shape
    mask = torch.arange(G).expand(B, G) < torch.tensor([6, 4, 1, 0]).unsqueeze(-1)
    exp = exp._replace(logprobs=exp.logprobs + 0.3 * torch.randn(B, G, generator=g),
                       values=exp.values + 0.3 * torch.randn(B, G, generator=g),
                       advantages=torch.randn(B, G, generator=g),
                       returns=torch.randn(B, G, generator=g), answer_mask=mask)
    return b, exp


@pytest.mark.parametrize("which", ["actor", "critic"])
def test_func_grad_equals_autograd(scored, which):
    b, exp = scored
    module, loss_fn, clip = ((b.actor, common._actor_loss, 0.2) if which == "actor" else
                             (b.critic, common._critic_loss, 0.2))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        fgrads = torch.func.grad(loss_fn)(params, module, exp, clip)
    module.zero_grad(set_to_none=True)
    loss = loss_fn(None, module, exp, clip)  # params=None: the module's own forward
    loss.backward()
    assert fgrads.keys() == params.keys()
    nonzero = 0
    for n, p in params.items():
        torch.testing.assert_close(fgrads[n], p.grad, atol=1e-6, rtol=0, msg=n)
        nonzero += int(p.grad.abs().max() > 0)
    assert nonzero > len(params) // 2  # the check is not vacuous
    module.zero_grad(set_to_none=True)


def test_train_step_leaves_no_autograd_graph(tiny_bundle, small_cfg, prompts_for):
    b, cfg = tiny_bundle("tiny-opt", seed=0), small_cfg()
    eng, state = _engine(b, cfg)
    exp = _experience(eng, state, prompts_for(b, cfg, seed=0), cfg)
    state, m = eng.train_step(state, exp, cfg.ppo, seed=0)
    for opt in (state.actor_opt, state.critic_opt):
        for t in list(opt.mu.values()) + list(opt.nu.values()):
            assert t.grad_fn is None and not t.requires_grad
    for x in m:
        assert x.grad_fn is None and x.shape == ()
    assert int(state.step) == 1


@pytest.mark.parametrize("which", ["actor", "critic"])
def test_grad_accum_equals_one_batch(scored, which):
    # equal token counts per micro-batch (full answer masks), so the mean of the micro-batch
    # gradients is the full-batch gradient; compared before Adam, which would blow up the
    # rounding noise of gradients that are 0 in exact arithmetic (e.g. k_proj.bias)
    b, exp = scored
    exp = exp._replace(answer_mask=torch.ones_like(exp.answer_mask))
    module, loss_fn = ((b.actor, common._actor_loss) if which == "actor" else
                       (b.critic, common._critic_loss))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    g1, l1 = common._grads(loss_fn, params, module, exp, 0.2, 1)
    for accum in (2, 4):
        g, loss = common._grads(loss_fn, params, module, exp, 0.2, accum)
        torch.testing.assert_close(loss, l1, atol=1e-6, rtol=0)
        for k in g1:
            torch.testing.assert_close(g[k], g1[k], atol=1e-6, rtol=1e-5, msg=k)


# ----------------------------------------------------------------------------- generation

def test_generate_seeds_and_shapes(tiny_bundle, small_cfg, prompts_for):
    b, cfg = tiny_bundle("tiny-opt", seed=0), small_cfg()
    eng, state = _engine(b, cfg)
    p = prompts_for(b, cfg, seed=0)
    r1 = eng.generate(state, p, cfg.gen, seed=1)
    B, P, G = cfg.batch, cfg.prompt_len, cfg.gen.gen_len
    assert r1.seq.shape == r1.attention_mask.shape == (B, P + G) and r1.prompt_len == P
    assert r1.answer_mask.shape == (B, G) and r1.answer_mask.all()
    assert torch.equal(r1.seq[:, :P], p.input_ids)
    assert torch.equal(r1.attention_mask, torch.cat([p.attention_mask, torch.ones(B, G,
                                                     dtype=torch.long)], 1))
    assert torch.equal(eng.generate(state, p, cfg.gen, seed=1).seq, r1.seq)  # same seed
    assert not torch.equal(eng.generate(state, p, cfg.gen, seed=2).seq, r1.seq)  # other seed
    greedy = GenerationConfig(gen_len=G, greedy=True)
    assert torch.equal(eng.generate(state, p, greedy, seed=1).seq,
                       eng.generate(state, p, greedy, seed=2).seq)  # greedy ignores the seed


# ----------------------------------------------------------------------------- ppo_step

def _snapshot(state):
    return ({k: v.detach().clone() for k, v in state.actor_params.items()},
            {k: v.detach().clone() for k, v in state.critic_params.items()})


def _run_ppo(bundle, cfg, prompts, seeds):
    eng, state = _engine(bundle, cfg)
    metrics = []
    for s in seeds:
        state, m = ppo_step(eng, state, prompts, cfg, seed=s)
        metrics.append(m)
    return state, metrics


def test_buffered_step_equals_work_done_by_hand(tiny_bundle, small_cfg, prompts_for):
    cfg = small_cfg(ppo=BUFFERED)
    seed = 123
    b = tiny_bundle("tiny-opt", seed=0)
    prompts = [prompts_for(b, cfg, seed=10), prompts_for(b, cfg, seed=11)]
    state_a, (m_a,) = _run_ppo(b, cfg, prompts, [seed])

    # by hand: two rollouts into one buffer of 8 rows, then 2 epochs x 2 shuffled minibatches
    # of 4 rows, each one train_step (whose 2 micro-batches are accumulated inside)
    eng, state = _engine(tiny_bundle("tiny-opt", seed=0), cfg)
    ppo = cfg.ppo
    exps = []
    for i, p in enumerate(prompts):
        exp = eng.score(state, eng.generate(state, p, cfg.gen, seed=fold_in(seed, 1, i)))
        rewards = kl_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.answer_mask,
                             ppo.kl_coef, ppo.clip_reward)
        adv, ret = gae(rewards, exp.values, exp.answer_mask, ppo.gamma, ppo.lam)
        exps.append(exp._replace(advantages=adv, returns=ret))
    buffer = Experience(*[torch.cat([x, y]) if isinstance(x, torch.Tensor) else x
                          for x, y in zip(*exps)])
    assert buffer.seq.shape[0] == 8
    metrics = []
    for epoch in range(2):
        order = torch.randperm(8, generator=torch.Generator().manual_seed(fold_in(seed, 2, epoch)))
        assert not torch.equal(order, torch.arange(8))  # the shuffle matters for this seed
        for j, rows in enumerate([order[:4], order[4:]]):
            state, m = eng.train_step(state, take(buffer, rows), ppo,
                                      seed=fold_in(seed, 3, epoch, j))
            metrics.append(m)

    assert int(state.step) == int(state_a.step) == 4
    for ours, theirs in zip(_snapshot(state_a), _snapshot(state)):
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k
    for name, x in m_a._asdict().items():
        want = torch.stack([getattr(m, name) for m in metrics]).mean()
        assert torch.equal(x, want), name


def test_same_seed_bit_identical_metrics(tiny_bundle, small_cfg, prompts_for):
    cfg = small_cfg(ppo=BUFFERED)
    runs = []
    for _ in range(2):
        b = tiny_bundle("tiny-opt", seed=0)
        prompts = [prompts_for(b, cfg, seed=10), prompts_for(b, cfg, seed=11)]
        runs.append(_run_ppo(b, cfg, prompts, [7, 8]))
    (s1, ms1), (s2, ms2) = runs
    for m1, m2 in zip(ms1, ms2):
        for name in m1._fields:
            assert torch.equal(getattr(m1, name), getattr(m2, name)), name
    for a, c in zip(_snapshot(s1), _snapshot(s2)):
        assert all(torch.equal(a[k], c[k]) for k in a)
    # and the step did something: parameters moved, metrics are finite and not all zero
    b0 = tiny_bundle("tiny-opt", seed=0)
    assert any(not torch.equal(p, s1.actor_params[n]) for n, p in b0.actor.named_parameters())
    assert all(torch.isfinite(x) for x in ms1[-1]) and float(ms1[-1].critic_loss) > 0
