"""Checks every registered engine must pass: the contract (CONTRACT) and parity with hf and the
imperative baseline (PARITY). tests/test_contract.py and tests/test_parity_baseline.py run each
over every name in engines.REGISTRY, read when they are collected, so an engine is covered the
day its registry line is added; tests/test_registry.py runs them on an engine registered at run
time. A check takes (name, tmp_path) and skips, with the reason, what cannot run here."""
from __future__ import annotations

import math
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

import engines
from baselines.imperative_ppo import ImperativePPO
from bench import parity
from core.checkpoint import CheckpointError, load_, save
from core.engine import EngineUnavailable
from core.models import trainable
from core.step import add_advantages, ppo_step
from core.types import GenerationConfig, PPOConfig, Prompts, RunConfig
from tests.conftest import make_bundle, make_cfg, make_prompts

CONTRACT, PARITY = [], []
GREEDY = dict(gen={"greedy": True})


def contract(check):
    CONTRACT.append(check)
    return check


def parity_check(check):
    PARITY.append(check)
    return check


def registry_names() -> list[str]:
    return list(engines.REGISTRY)


def start(name: str, bundle, cfg, **kw):
    """(engine, state) of `name` initialised on `bundle`, or a skip saying why it cannot run."""
    why = engines.missing(name, cfg.device)
    if why:
        pytest.skip(f"{name}: {why}")
    engine = engines.get(name, **kw)
    try:
        return engine, engine.init(bundle, cfg, seed=0)
    except EngineUnavailable as e:
        pytest.skip(f"{name}: {e}")


def _move_(bundle, seed: int) -> None:
    """Every trainable actor and critic tensor moved by seeded noise, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*trainable(bundle.actor).values(), *trainable(bundle.critic).values()]:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _same_experience(got, want):
    for field in ("logprobs", "ref_logprobs", "values", "scores"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), msg=field)


# ---------------------------------------------------------------- the contract

@contract
def two_states_compute_with_the_weights_they_hold(name, tmp_path):
    """One engine, two states: its init's, and one loaded from a checkpoint into another bundle
    built alike. Each generates and scores what it holds (the loaded one as a fresh engine on
    that bundle does), with no sync in between, and the first is as it was after the second."""
    cfg = make_cfg(**GREEDY)
    engine, sa = start(name, make_bundle(seed=0), cfg)
    src = make_bundle(seed=0)
    hf = engines.get("hf")
    s_src = hf.init(src, cfg, seed=0)
    _move_(src, seed=7)
    save(str(tmp_path / "ckpt"), s_src, src, seed=0, step=1, config_dict={})
    loaded = make_bundle(seed=0)
    sb, _ = load_(str(tmp_path / "ckpt"), loaded)
    prompts = make_prompts(loaded, cfg, seed=1)

    ra = engine.generate(sa, prompts, cfg.gen, seed=0)
    rb = engine.generate(sb, prompts, cfg.gen, seed=0)
    assert not torch.equal(ra.seq, rb.seq), "the two states' weights gave one rollout"
    assert torch.equal(engine.generate(sa, prompts, cfg.gen, seed=0).seq, ra.seq)
    fresh, fs = start(name, loaded, cfg)
    assert torch.equal(fresh.generate(fs, prompts, cfg.gen, seed=0).seq, rb.seq)

    exp_a, exp_b = engine.score(sa, rb), engine.score(sb, rb)
    _same_experience(exp_b, fresh.score(fs, rb))
    assert (exp_a.logprobs - exp_b.logprobs).abs().max() > 1e-3
    assert (exp_a.values - exp_b.values).abs().max() > 1e-3
    _same_experience(engine.score(sa, rb), exp_a)   # the engine's own weights are back


@contract
def each_new_state_gets_its_own_weights_not_an_earlier_copy(name, tmp_path):
    """States over plain tensors, made one after another where the freed one's memory is likely
    reused: each generates what a fresh engine on a bundle with those weights generates (no
    copy made from an earlier state is taken for current)."""
    cfg = make_cfg(**GREEDY)
    engine, s0 = start(name, make_bundle(seed=0), cfg)
    prompts = make_prompts(make_bundle(seed=0), cfg, seed=1)
    for factor in (1.5, 0.7):
        other = s0._replace(actor_params={k: v.detach() * factor
                                          for k, v in s0.actor_params.items()})
        got = engine.generate(other, prompts, cfg.gen, seed=0).seq
        twin = make_bundle(seed=0)
        with torch.no_grad():
            for p in trainable(twin.actor).values():
                p.mul_(factor)
        fresh, fs = start(name, twin, cfg)
        assert torch.equal(got, fresh.generate(fs, prompts, cfg.gen, seed=0).seq), factor
        del other


@contract
def a_second_init_serves_the_second_model(name, tmp_path):
    cfg = make_cfg(**GREEDY)
    a, b = make_bundle(seed=0), make_bundle(seed=1)
    engine, sa = start(name, a, cfg)
    prompts = make_prompts(a, cfg, seed=2)
    engine.sync(sa)
    engine.generate(sa, prompts, cfg.gen, seed=0)
    sb = engine.init(b, cfg, seed=0)
    engine.sync(sb)
    got = engine.generate(sb, prompts, cfg.gen, seed=0)
    hf = engines.get("hf")
    want = hf.generate(hf.init(b, cfg, seed=0), prompts, cfg.gen, seed=0)
    assert torch.equal(got.seq, want.seq)


@contract
def a_donated_state_is_refused_and_the_new_one_trains(name, tmp_path):
    cfg = make_cfg()
    bundle = make_bundle()
    engine, s0 = start(name, bundle, cfg)
    prompts = make_prompts(bundle, cfg, seed=0)
    exp = add_advantages(engine.score(s0, engine.generate(s0, prompts, cfg.gen, seed=0)),
                         cfg.ppo)
    s1, _ = engine.train_step(s0, exp, cfg.ppo, seed=0)
    count = int(s1.actor_opt.count)
    with pytest.raises(ValueError, match="this state was donated to an earlier train_step"):
        engine.train_step(s0, exp, cfg.ppo, seed=0)
    assert int(s1.actor_opt.count) == count               # refused before anything moved
    s2, _ = engine.train_step(s1, exp, cfg.ppo, seed=0)
    assert int(s2.step) == 2 and int(s2.actor_opt.count) == count + 1
    with pytest.raises(ValueError, match="has no advantages or returns; pass it through "
                                         "core.step.add_advantages"):
        engine.train_step(s2, exp._replace(advantages=None), cfg.ppo, seed=0)
    with pytest.raises(CheckpointError, match="donated to a train_step"):
        save(str(tmp_path), s1, bundle, seed=0, step=1, config_dict={})
    save(str(tmp_path), s2, bundle, seed=0, step=2, config_dict={})   # the live one saves


@contract
def train_step_refuses_a_state_over_another_bundle(name, tmp_path):
    cfg = make_cfg()
    a, b = make_bundle(seed=0), make_bundle(seed=1)
    ea, sa = start(name, a, cfg)
    eb, sb = start(name, b, cfg)
    exp = add_advantages(eb.score(sb, eb.generate(sb, make_prompts(b, cfg, seed=0), cfg.gen,
                                                  seed=0)), cfg.ppo)
    before = {k: v.clone() for k, v in sa.actor_params.items()}
    with pytest.raises(ValueError, match="this state holds another model's parameters"):
        eb.train_step(sa, exp, cfg.ppo, seed=0)
    assert all(torch.equal(before[k], v) for k, v in sa.actor_params.items())


def _bad_prompts(bundle, cfg):
    good = make_prompts(bundle, cfg, seed=0)
    ids, am = good
    V = bundle.config.vocab_size
    return {
        "a tuple": ((ids, am), "prompts must be core.types.Prompts"),
        "float ids": (Prompts(ids.float(), am), "input_ids must be integer token ids"),
        "1-D": (Prompts(ids[0], am[0]), "must be (B, P) tensors of one shape"),
        "shapes differ": (Prompts(ids, am[:, 1:]), "must be (B, P) tensors of one shape"),
        "id too large": (Prompts(ids.clone().fill_(V), am), f"token ids must lie in [0, {V})"),
        "negative id": (Prompts(ids.clone().fill_(-1), am), f"token ids must lie in [0, {V})"),
        "empty batch": (Prompts(ids[:0], am[:0]), "at least one row and one position"),
        "right-padded": (Prompts(ids, torch.cat([am[:, 1:], torch.zeros_like(am[:, :1])], 1)),
                         "prompts must be left-padded"),
        "too long": (Prompts(ids.repeat(1, 40), torch.ones_like(am).repeat(1, 40)),
                     "is longer than the model's 256 positions"),
    }


@contract
def generate_arguments_are_checked_in_one_line(name, tmp_path):
    cfg = make_cfg()
    bundle = make_bundle()
    engine, state = start(name, bundle, cfg)
    engine.sync(state)
    for case, (prompts, match) in _bad_prompts(bundle, cfg).items():
        with pytest.raises(ValueError, match=re.escape(match)) as err:
            engine.generate(state, prompts, cfg.gen, seed=0)
        assert "\n" not in str(err.value), case
    with pytest.raises(ValueError, match="seed must be an int, got None"):
        engine.generate(state, make_prompts(bundle, cfg, seed=0), cfg.gen, seed=None)
    import numpy as np   # a numpy integer is an integer
    engine.generate(state, make_prompts(bundle, cfg, seed=0),
                    GenerationConfig(gen_len=np.int64(2)), seed=np.int64(3))


@contract
def the_weight_copies_it_declares_are_the_ones_it_holds(name, tmp_path):
    """After the parity probe's calls (a greedy generate, the engine's own log-probs of it),
    the tensors alive beyond the run's own and what was alive before come to the copies of the
    actor's weights the engine declares, within a quarter copy (bench.holdings)."""
    from bench import holdings
    before = holdings.live_holdings()
    cfg = make_cfg(**GREEDY)
    bundle = make_bundle(seed=0)
    engine, state = start(name, bundle, cfg)
    rollout = engine.generate(state, make_prompts(bundle, cfg, seed=1), cfg.gen, seed=0)
    if hasattr(engine, "answer_logprobs"):
        engine.answer_logprobs(state, rollout)
    del rollout
    measured = holdings.weight_copies(engine, bundle, state, exclude=before)
    assert abs(measured - engine.weight_copies) <= 0.25, (measured, engine.weight_copies)


# ---------------------------------------------------------------- parity

@parity_check
def the_harness_parity_probe_passes(name, tmp_path):
    """bench.parity's probe, as each worker runs it (hf the reference, on a bundle of its own),
    then the harness's verdict: fp32 engines agree with hf within the tolerance, in a full run
    and in a generation-only one (the actor alone, no optimiser state)."""
    for gen_only in (False, True):
        mine = _probe(name, tmp_path / f"gen_only_{gen_only}", gen_only)
        d = SimpleNamespace(engine=name,
                            parity_max_abs_diff=mine.get("gen_max_abs_diff", math.nan),
                            score_parity_max_abs_diff=mine["max_abs_diff"],
                            parity_token_agreement=mine["token_agreement"],
                            parity_divergence_margin=mine["divergence_margin"])
        tol = parity.parity_tolerance("float32", mine["logit_scale"])
        assert parity.parity_failure(d, tol) == "", (gen_only, mine)
        assert mine["token_agreement"] == 1.0
        # every engine but the reference reports its own generation path
        assert "gen_max_abs_diff" in mine or name == parity.REFERENCE


def _probe(name, where, gen_only: bool) -> dict:
    """The parity rows (metric -> value) of engine `name` after hf's probe as reference."""
    cfg = make_cfg(**GREEDY, train=not gen_only)
    gen = GenerationConfig(gen_len=cfg.gen.gen_len, greedy=True)
    where.mkdir()
    ref_path, rows = str(where / "parity_ref.safetensors"), {}
    for who, reference in (("hf", True), (name, False)):
        bundle = make_bundle(seed=0, actor_only=gen_only)
        engine, state = start(who, bundle, cfg)
        got = rows.setdefault(who, {})
        parity.probe(lambda metric, value, unit: got.__setitem__(metric, value), engine, state,
                     bundle, make_prompts(bundle, cfg, seed=3), gen, seed=5,
                     ref_path=ref_path, reference=reference)
    return rows[name]


STEPS, BATCH, PROMPT, ANSWER = 3, 4, 8, 6
# lr 3e-4: parameters move ~1e-3 in 3 steps, 100x the tolerance, so a wrong gradient shows.
# eps 1e-6 (on both sides): attention key biases have a gradient that is exactly 0 in exact
# arithmetic (softmax ignores a constant shift), so both sides see only float32 rounding noise
# (~1e-10) there, and Adam scales it to lr*g/(|g|+eps); with the default 1e-8 that noise alone
# moves those biases by up to ~1e-5 differently on the two sides. Real gradients are >> 1e-6.
LR, EPS = 3e-4, 1e-6


def steps_equal_the_imperative_baseline(name, preset):
    """core.step.ppo_step on engine `name` == baselines/imperative_ppo.py (nn.Module calls,
    loss.backward(), torch.optim.AdamW, its own loops), on two bundles built from one seed.
    Greedy, fixed-length answers, fp32."""
    ppo = PPOConfig(actor_lr=LR, critic_lr=LR, eps=EPS)  # DeepSpeed-Chat defaults otherwise
    cfg = RunConfig(preset=preset, batch=BATCH, prompt_len=PROMPT, reward="model",
                    gen=GenerationConfig(gen_len=ANSWER, greedy=True), ppo=ppo)
    core_b, base_b = make_bundle(preset, seed=0), make_bundle(preset, seed=0)
    start_w = {n: p.detach().clone() for n, p in core_b.actor.named_parameters()}

    engine, state = start(name, core_b, cfg)
    base = ImperativePPO(base_b.actor, base_b.ref, base_b.critic, base_b.reward,
                         pad_id=base_b.pad_id, kl_coef=ppo.kl_coef, clip_reward=ppo.clip_reward,
                         cliprange=ppo.cliprange, cliprange_value=ppo.cliprange_value,
                         gamma=ppo.gamma, lam=ppo.lam, actor_lr=ppo.actor_lr,
                         critic_lr=ppo.critic_lr, betas=ppo.betas, eps=ppo.eps,
                         weight_decay=ppo.weight_decay)

    for step in range(STEPS):
        prompts = make_prompts(core_b, cfg, seed=100 + step)  # left-padded, varied lengths
        rollout = engine.generate(state, prompts, cfg.gen, seed=step)  # greedy: ppo_step's
        state, m = ppo_step(engine, state, prompts, cfg, seed=step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the baseline calls float() on a grad-tracking loss
            b_actor, b_critic, b_seq = base.step(prompts.input_ids, prompts.attention_mask,
                                                 ANSWER)
        assert torch.equal(rollout.seq, b_seq), f"step {step}: greedy answers differ"
        assert abs(float(m.actor_loss) - b_actor) <= 1e-5, (step, float(m.actor_loss), b_actor)
        assert abs(float(m.critic_loss) - b_critic) <= 1e-5, (step, float(m.critic_loss), b_critic)

    for which, ours, theirs in (("actor", core_b.actor, base_b.actor),
                                ("critic", core_b.critic, base_b.critic)):
        theirs_p = dict(theirs.named_parameters())
        for n, p in ours.named_parameters():
            torch.testing.assert_close(p.detach(), theirs_p[n].detach(), atol=1e-5, rtol=0,
                                       msg=lambda s, n=n: f"{which} {n}: {s}")
    # the comparison is not vacuous: training moved the actor far beyond the tolerance
    moved = max(float((p.detach() - start_w[n]).abs().max())
                for n, p in core_b.actor.named_parameters())
    assert moved > 1e-4
    # the frozen models stayed put on both sides
    for a, b in ((core_b.ref, base_b.ref), (core_b.reward, base_b.reward)):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(start_w[n], p) for n, p in core_b.ref.named_parameters())


@parity_check
def ppo_steps_equal_the_imperative_baseline(name, tmp_path):
    steps_equal_the_imperative_baseline(name, "tiny-opt")
