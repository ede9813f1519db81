"""Numeric guards: a NaN/inf stops the step before any weight moves, naming phase and tensor."""
from __future__ import annotations

import pytest
import torch

from core.guards import NonFiniteError, check_finite, check_grads
from core.step import add_advantages, ppo_step
from engines import common
from engines.hf import HFEngine

from conftest import make_bundle, make_cfg, make_prompts

FC1 = "model.decoder.layers.0.fc1.weight"


def test_check_finite_names_the_first_bad_tensor():
    ok, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    check_finite("score", a=ok, b=None)
    with pytest.raises(NonFiniteError) as e:
        check_finite("score", a=ok, b=bad, c=bad * float("nan"))
    assert (e.value.phase, e.value.name) == ("score", "b")
    assert str(e.value) == "non-finite b in phase score"
    e.value.step = 3  # the harness knows the step index, and may add it
    assert str(e.value) == "non-finite b in phase score (step 3)"

    grads = {"w": ok, FC1: bad}
    with pytest.raises(NonFiniteError, match=f"non-finite actor gradient '{FC1}' in phase train"):
        check_grads("train", "actor gradient", grads, torch.linalg.vector_norm(bad))
    # finite gradients whose norm overflowed float32 are not an error
    check_grads("train", "actor gradient", {"w": torch.full((4,), 3e38)}, torch.tensor(torch.inf))


def snapshot(bundle, state):
    """Clones of every trainable weight and Adam moment."""
    out = {f"actor.{k}": p.detach().clone() for k, p in bundle.actor.named_parameters()}
    out.update({f"critic.{k}": p.detach().clone() for k, p in bundle.critic.named_parameters()})
    for w, opt in (("actor", state.actor_opt), ("critic", state.critic_opt)):
        out[f"{w}.count"] = opt.count.clone()
        out.update({f"{w}.mu.{k}": v.clone() for k, v in opt.mu.items()})
        out.update({f"{w}.nu.{k}": v.clone() for k, v in opt.nu.items()})
    return out


def assert_untouched(before, bundle, state):
    after = snapshot(bundle, state)
    assert before.keys() == after.keys()
    for k in before:
        # bit-identical; the NaN we planted counts as equal to itself
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.fixture
def run():
    """A tiny hf run one good PPO step in (so Adam moments are non-zero)."""
    cfg = make_cfg(ppo=dict(actor_lr=1e-3, critic_lr=1e-3))
    bundle = make_bundle("tiny-opt", seed=0)
    eng = HFEngine()
    state = eng.init(bundle, cfg, seed=0)
    state, _ = ppo_step(eng, state, make_prompts(bundle, cfg, seed=0), cfg, seed=0)
    return cfg, bundle, eng, state


@pytest.mark.parametrize("module, phase, name", [("reward", "score", "scores"),
                                                 ("critic", "score", "values"),
                                                 ("actor", "score", "logprobs")])
def test_nan_weight_stops_in_score(run, module, phase, name):
    cfg, bundle, eng, state = run
    m = getattr(bundle, module)
    w = m.v_head.weight if module != "actor" else dict(m.named_parameters())[FC1]
    with torch.no_grad():
        w[0, 0] = float("nan")
    before = snapshot(bundle, state)
    with pytest.raises(NonFiniteError) as e:
        ppo_step(eng, state, make_prompts(bundle, cfg, seed=1), cfg, seed=1)
    assert (e.value.phase, e.value.name) == (phase, name)
    assert_untouched(before, bundle, state)


def test_nan_advantage_input_stops_in_advantages(run):
    cfg, bundle, eng, state = run
    exp = eng.score(state, eng.generate(state, make_prompts(bundle, cfg, seed=1), cfg.gen,
                                        seed=1))
    # finite inputs whose KL penalty overflows float32: rewards are -inf, caught by name
    exp = exp._replace(logprobs=exp.logprobs.clone().fill_(3e38),
                       ref_logprobs=exp.ref_logprobs.clone().fill_(-3e38))
    with pytest.raises(NonFiniteError) as e:
        add_advantages(exp, cfg.ppo)
    assert (e.value.phase, e.value.name) == ("advantages", "rewards")


def _experience(run):
    cfg, bundle, eng, state = run
    exp = eng.score(state, eng.generate(state, make_prompts(bundle, cfg, seed=1), cfg.gen,
                                        seed=1))
    return add_advantages(exp, cfg.ppo)


def test_nan_loss_stops_before_update(run):
    cfg, bundle, eng, state = run
    exp = _experience(run)
    adv = exp.advantages.clone()
    adv[1, 2] = float("nan")
    before = snapshot(bundle, state)
    with pytest.raises(NonFiniteError) as e:
        eng.train_step(state, exp._replace(advantages=adv), cfg.ppo, seed=0)
    assert (e.value.phase, e.value.name) == ("train", "actor_loss")
    assert_untouched(before, bundle, state)


@pytest.mark.parametrize("which, name", [("actor", FC1), ("critic", "v_head.weight")])
def test_nan_gradient_stops_before_either_update(run, monkeypatch, which, name):
    """A NaN in one gradient (injected after autograd, as a bad kernel would leave it) stops
    the step with both models untouched; for the critic, the actor has not moved either."""
    cfg, bundle, eng, state = run
    exp = _experience(run)
    grads = common._grads

    def poisoned(loss_fn, params, *a):
        g, loss = grads(loss_fn, params, *a)
        if name in g and (loss_fn is common._actor_loss) == (which == "actor"):
            g[name] = g[name].clone()
            g[name][0, -1] = float("nan")
        return g, loss
    monkeypatch.setattr(common, "_grads", poisoned)
    before = snapshot(bundle, state)
    with pytest.raises(NonFiniteError) as e:
        eng.train_step(state, exp, cfg.ppo, seed=0)
    assert str(e.value) == f"non-finite {which} gradient '{name}' in phase train"
    assert_untouched(before, bundle, state)
    monkeypatch.undo()
    state, m = eng.train_step(state, exp, cfg.ppo, seed=0)  # the kept state still trains
    assert torch.isfinite(m.grad_norm_actor) and int(state.step) == 2
