"""The engine contract as a user's own loop meets it: every registered engine runs the checks in
tests/engine_checks.py (states that compute with the weights they hold, donated states,
re-initialising, one-line errors for arguments the engines cannot use); second copies follow
the weights however they moved; `engines.common.bound` moves nothing for an engine's own state
and restores every slot after another's."""
from __future__ import annotations

import re

import pytest
import torch

import engines
from core.step import ppo_step
from core.types import GenerationConfig, Prompts
from engines import common
from tests.conftest import make_bundle, make_cfg, make_prompts
from tests.engine_checks import CONTRACT, registry_names
from tests.test_hybrid import _pair   # hf and the engine on one bundle

GREEDY = dict(gen={"greedy": True})


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", registry_names())
def test_engine_keeps_the_contract(name, check, tmp_path):
    check(name, tmp_path)


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


def test_bound_moves_nothing_for_the_modules_own_tensors():
    b = make_bundle()
    slots = [(m, k, p) for m in b.actor.modules() for k, p in m._parameters.items()]
    with common.bound(b.actor, dict(b.actor.named_parameters())):
        assert all(m._parameters[k] is p for m, k, p in slots)
    assert common.owns(b.actor, dict(b.actor.named_parameters()))


def test_bound_swaps_every_slot_tied_ones_too_and_restores_them_on_error():
    b = make_bundle()
    own = dict(b.actor.named_parameters())
    embed = next(k for k in own if "embed_tokens" in k)
    assert b.actor.lm_head.weight is own[embed]                 # tiny-opt ties its lm_head
    other = {k: v.detach() * 2 for k, v in own.items()}
    slots = [(m, k, p) for m in b.actor.modules() for k, p in m._parameters.items()]
    with pytest.raises(RuntimeError, match="inside"):
        with common.bound(b.actor, other):
            assert b.actor.lm_head.weight is other[embed]
            assert all(p is other[n] for n, p in b.actor.named_parameters())
            assert not common.owns(b.actor, own)
            raise RuntimeError("inside")
    assert all(m._parameters[k] is p for m, k, p in slots)


@pytest.mark.parametrize("case, match", [
    ("names", "this state's parameters are not this model's"),
    ("shape", "the model's (512, 64)"),
    ("zero3", "cannot be bound under ZeRO-3"),
])
def test_bound_refuses_what_it_cannot_bind_in_one_line(case, match):
    b = make_bundle()
    own = dict(b.actor.named_parameters())
    k = next(iter(own))
    other = {n: v.detach().clone() for n, v in own.items()}
    if case == "names":
        other["no.such.weight"] = other.pop(k)
    elif case == "shape":
        other[k] = other[k][:-1]
    else:
        own[k].ds_id = 0          # as DeepSpeed marks a partitioned parameter
    with pytest.raises(ValueError, match=re.escape(match)) as err:
        with common.bound(b.actor, other):
            pass
    assert "\n" not in str(err.value)
