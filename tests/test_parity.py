"""Columns that can fail: the parity verdict judges each engine's own generation path against
hf's log-probs (and its scoring beside it), a value not measured fails every engine but hf, and
the weight copies an engine declares are checked against the tensors the process holds. Every
registered engine runs both checks in tests/engine_checks.py; these are the cases a correct
engine never shows."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

import engines
from bench import holdings, parity
from core.types import GenerationConfig
from engines.hf import HFEngine
from tests.conftest import make_bundle, make_cfg, make_prompts

GREEDY = GenerationConfig(gen_len=6, greedy=True)
NAN = math.nan


def _row(engine, gen=0.0, score=0.0, margin=0.0, tol=1e-3) -> dict:
    return dict(engine=engine, status="ok", parity_max_abs_diff=gen,
                score_parity_max_abs_diff=score, parity_token_agreement=1.0,
                parity_divergence_margin=margin, parity_tol=tol, parity_logit_scale=1.0)


def test_a_parity_not_measured_fails_every_engine_but_hf():
    rows = [_row("hf", gen=NAN, score=NAN, margin=NAN), _row("hybrid"),
            _row("ds-inference", gen=NAN), _row("vllm", score=NAN),
            _row("odd", margin=NAN), _row("slow", gen=2e-3)]
    failed, tol = parity.verdict(pd.DataFrame(rows), "float32")
    assert set(failed) == {"ds-inference", "vllm", "odd", "slow"}
    assert failed["ds-inference"] == ("failed: parity with hf not measured: no log-probs from "
                                      "its generation path (answer_logprobs)")
    assert failed["vllm"].endswith("not measured: no log-probs from its scoring")
    assert failed["odd"].endswith("not measured: no greedy divergence margin")
    assert failed["slow"].startswith("failed: parity with hf: max |logprob diff| 0.002 "
                                     "(scoring 0, generation 0.002; tol 0.001)")
    assert tol["max_abs_diff"] == 1e-3


def _probe(engine, bundle, cfg, where) -> dict:
    """The parity rows (metric -> value) of `engine` after hf's probe as reference."""
    ref_path, rows = str(where / "parity_ref.safetensors"), {}
    for who, b, reference in ((HFEngine(), make_bundle(seed=0), True),
                              (engine, bundle, False)):
        state = who.init(b, cfg, seed=0)
        got = rows.setdefault(reference, {})
        parity.probe(lambda metric, value, unit: got.__setitem__(metric, value), who, state, b,
                     make_prompts(b, cfg, seed=3), GREEDY, seed=5, ref_path=ref_path,
                     reference=reference)
    return rows[False]


def test_a_generation_path_off_by_a_tenth_fails_the_verdict(tmp_path):
    """The same tokens and the same (shared) scoring as hf: only the generation path's own
    log-probs, 0.1 nats off, tell this engine from a correct one."""
    cfg = make_cfg(gen=GREEDY)
    engine = engines.get("hybrid")
    right = engine.answer_logprobs
    engine.answer_logprobs = lambda state, rollout: right(state, rollout) + 0.1
    mine = _probe(engine, make_bundle(seed=0), cfg, tmp_path)
    assert mine["token_agreement"] == 1.0 and mine["max_abs_diff"] == 0.0
    assert mine["gen_max_abs_diff"] == pytest.approx(0.1, abs=1e-4)
    row = _row("broken", gen=mine["gen_max_abs_diff"], score=mine["max_abs_diff"],
               margin=mine["divergence_margin"],
               tol=parity.parity_tolerance("float32", mine["logit_scale"]))
    failed, _ = parity.verdict(pd.DataFrame([row]), "float32")
    assert "generation 0.1; tol 0.001" in failed["broken"]


@pytest.mark.skipif(engines.missing("ds-inference", "cpu") is not None,
                    reason="needs the deepspeed package")
def test_ds_inference_answer_logprobs_are_its_inference_module_s_and_agree_with_hf():
    cfg = make_cfg(gen=GREEDY)
    bundle = make_bundle(seed=0)
    hf, ds = HFEngine(), engines.get("ds-inference")
    hs, s = hf.init(bundle, cfg, seed=0), ds.init(bundle, cfg, seed=0)
    rollout = hf.generate(hs, make_prompts(bundle, cfg, seed=1), GREEDY, seed=0)
    want = hf.score(hs, rollout).logprobs
    tol = parity.parity_tolerance("float32", parity.top_logit_scale(bundle.actor, rollout))
    mine = ds.answer_logprobs(s, rollout)
    assert mine.shape == want.shape and mine.dtype == torch.float32
    assert parity.max_gap(mine, want, rollout.answer_mask) <= tol
    # they come from the inference copy: moved there alone, they move, scoring does not
    with torch.no_grad():
        for p in ds.infer.module.parameters():
            p.mul_(1.05)
    assert parity.max_gap(ds.answer_logprobs(s, rollout), want, rollout.answer_mask) > 10 * tol
    assert torch.equal(ds.score(s, rollout).logprobs, want)


class _Hoarder(HFEngine):
    """hf, keeping a spare copy of the actor it never declares."""

    def init(self, models, cfg, *, seed):
        self.spare = copy.deepcopy(models.actor)
        return super().init(models, cfg, seed=seed)


def test_a_copy_the_engine_does_not_declare_is_counted():
    before = holdings.live_holdings()
    cfg = make_cfg(gen=GREEDY)
    bundle = make_bundle(seed=0)
    engine = _Hoarder()
    state = engine.init(bundle, cfg, seed=0)
    engine.generate(state, make_prompts(bundle, cfg, seed=1), GREEDY, seed=0)
    assert holdings.weight_copies(engine, bundle, state, exclude=before) == pytest.approx(2.0)
    assert engine.weight_copies == 1
    del engine.spare
    assert holdings.weight_copies(engine, bundle, state, exclude=before) == pytest.approx(1.0)
