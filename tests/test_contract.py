"""The engine contract as a user's own loop meets it: donated states, second copies that follow
the weights however they moved, re-initialising an engine, and one-line errors for arguments
the engines cannot use (before they reach torch)."""
from __future__ import annotations

import re

import pytest
import torch

import engines
from core.step import add_advantages, ppo_step
from core.types import GenerationConfig, Prompts
from tests.conftest import make_bundle, make_cfg, make_prompts
from tests.test_hybrid import _pair   # hf and the engine on one bundle

GREEDY = dict(gen={"greedy": True})


def _scale_(bundle, factor, through_data):
    """Move every actor weight in place, as a checkpoint load or the caller's own step would;
    through `.data`, torch's version counters do not see it."""
    with torch.no_grad():
        for p in bundle.actor.parameters():
            (p.data if through_data else p).mul_(factor)


def _agree(pk, ps, hf, hs, prompts, gen):
    want = hf.generate(hs, prompts, gen, seed=0)
    got = pk.generate(ps, prompts, gen, seed=0)
    assert torch.equal(got.seq, want.seq)
    torch.testing.assert_close(pk.answer_logprobs(ps, got),
                               hf.score(hs, want).logprobs, atol=1e-4, rtol=0)


def test_packed_copy_follows_weights_moved_outside_train_step():
    b, cfg, hf, hs, pk, ps = _pair("tiny-opt", "hybrid-packed", **GREEDY)
    prompts = make_prompts(b, cfg, seed=1)
    pk.sync(ps)
    pk.generate(ps, prompts, cfg.gen, seed=0)          # packs the initial weights
    _scale_(b, 1.5, through_data=True)
    pk.sync(ps)                                         # an explicit sync always re-packs
    _agree(pk, ps, hf, hs, prompts, cfg.gen)
    _scale_(b, 0.8, through_data=False)
    _agree(pk, ps, hf, hs, prompts, cfg.gen)            # no sync: the versions moved, re-packed


def test_a_second_init_packs_afresh():
    """The same bundle, its weights moved where version counters do not see it, then a new
    init and a generate with no sync: nothing of the first init's packed copy is used."""
    b, cfg, hf, hs, pk, ps = _pair("tiny-opt", "hybrid-packed", **GREEDY)
    prompts = make_prompts(b, cfg, seed=1)
    pk.sync(ps)
    pk.generate(ps, prompts, cfg.gen, seed=0)
    _scale_(b, 1.5, through_data=True)
    ps = pk.init(b, cfg, seed=0)
    _agree(pk, ps, hf, hs, prompts, cfg.gen)


@pytest.mark.parametrize("name", ["hybrid", "hybrid-packed"])
def test_a_second_init_serves_the_second_model(name):
    cfg = make_cfg(**GREEDY)
    a, b = make_bundle(seed=0), make_bundle(seed=1)
    engine = engines.get(name)
    sa = engine.init(a, cfg, seed=0)
    prompts = make_prompts(a, cfg, seed=2)
    engine.sync(sa)
    engine.generate(sa, prompts, cfg.gen, seed=0)
    sb = engine.init(b, cfg, seed=0)
    engine.sync(sb)
    got = engine.generate(sb, prompts, cfg.gen, seed=0)
    hf = engines.get("hf")
    want = hf.generate(hf.init(b, cfg, seed=0), prompts, cfg.gen, seed=0)
    assert torch.equal(got.seq, want.seq)


@pytest.mark.parametrize("name", ["hf", "hybrid"])
def test_a_donated_state_is_refused_and_the_new_one_trains(name, tmp_path):
    cfg = make_cfg()
    bundle = make_bundle()
    engine = engines.get(name)
    s0 = engine.init(bundle, cfg, seed=0)
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
    from core.checkpoint import CheckpointError, save
    with pytest.raises(CheckpointError, match="donated to a train_step"):
        save(str(tmp_path), s1, bundle, seed=0, step=1, config_dict={})
    save(str(tmp_path), s2, bundle, seed=0, step=2, config_dict={})   # the live one saves


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature must be a positive finite number"),
    (dict(temperature=-1.0), "temperature must be a positive finite number"),
    (dict(gen_len=0), "gen_len must be an int of at least 1"),
    (dict(temperature="1.0"), "temperature must be a positive finite number"),
    (dict(temperature=True), "temperature must be a positive finite number"),
])
def test_generation_config_refuses_what_no_engine_can_do(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kw)


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


@pytest.mark.parametrize("name", ["hf", "hybrid", "ds-inference"])
def test_generate_arguments_are_checked_in_one_line(name):
    cfg = make_cfg()
    bundle = make_bundle()
    engine = engines.get(name)
    state = engine.init(bundle, cfg, seed=0)
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


def test_ppo_step_wants_one_prompt_batch_per_generation_batch():
    cfg = make_cfg(ppo={"generation_batches": 2})
    bundle = make_bundle()
    engine = engines.get("hf")
    state = engine.init(bundle, cfg, seed=0)
    p = make_prompts(bundle, cfg, seed=0)
    with pytest.raises(ValueError, match="1 prompt batch\\(es\\) for generation_batches=2"):
        ppo_step(engine, state, p, cfg, seed=0)
    short = Prompts(p.input_ids[:, 2:], p.attention_mask[:, 2:])
    with pytest.raises(ValueError, match=re.escape("the prompt batches differ in shape ((4, 6), "
                                                   "(4, 8))")):
        ppo_step(engine, state, [p, short], cfg, seed=0)


def test_a_state_over_another_bundle_is_refused():
    cfg = make_cfg()
    a, b = make_bundle(seed=0), make_bundle(seed=1)
    ea, eb = engines.get("hf"), engines.get("hf")
    sa, sb = ea.init(a, cfg, seed=0), eb.init(b, cfg, seed=0)
    exp = add_advantages(eb.score(sb, eb.generate(sb, make_prompts(b, cfg, seed=0), cfg.gen,
                                                  seed=0)), cfg.ppo)
    before = {k: v.clone() for k, v in sa.actor_params.items()}
    with pytest.raises(ValueError, match="this state holds another model's parameters"):
        eb.train_step(sa, exp, cfg.ppo, seed=0)
    assert all(torch.equal(before[k], v) for k, v in sa.actor_params.items())


def test_core_imports_nothing_else_of_the_project():
    """core/ stands alone (README, Layout): no import of engines, bench or baselines, at module
    level or inside a function; an engine hands core what it needs (a faster noise draw, say)."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    found = []
    for path in sorted((root / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            found += [f"{path.name}: {n}" for n in names
                      if n.split(".")[0] in ("engines", "bench", "baselines", "tests")]
    assert not found, found
