"""A new engine is covered by the contract and parity tests the day it is registered: an engine
defined here, registered at run time, runs every check those tests run for each registry
name, with no test edited."""
from __future__ import annotations

import pytest
import torch

import engines
from core.engine import check_generate_args
from core.models import position_ids
from core.rng import noisy_scores
from core.types import Prompts
from engines import common, kernels
from tests.engine_checks import CONTRACT, PARITY, registry_names


class RecomputeEngine:
    """The slowest honest engine: each answer token from a full forward over the sequence so
    far (no KV cache), sampled as hf samples; scoring and training are the shared torch ones."""
    weight_copies = 1

    def __init__(self, name: str = "recompute"):
        self.name = name

    def init(self, models, cfg, *, seed):
        self.models, self.cfg = models, cfg
        state, self.opts = common.init_state(models, cfg)
        return state

    def sync(self, state):
        pass

    @torch.no_grad()
    def generate(self, state, prompts, gen, *, seed):
        m = self.models
        check_generate_args(prompts, m.config, gen, seed)

        def pick(t, logits):
            if not gen.greedy:
                logits = noisy_scores(logits, seed, t, gen.temperature,
                                      uniform=kernels.counter_uniform)
            return logits.argmax(-1)

        answer = self._decode(state, prompts, gen.gen_len, pick)
        return common.finish_rollout(prompts, answer, m.pad_id, m.eos_id, gen.stop_at_eos)

    @torch.no_grad()
    def answer_logprobs(self, state, rollout):
        """Its own forwards' log-probs of the rollout's answer tokens, fed those tokens."""
        P, out = rollout.prompt_len, []
        forced = rollout.seq[:, P:]

        def pick(t, logits):
            out.append(logits.float().log_softmax(-1).gather(-1, forced[:, t, None])[:, 0])
            return forced[:, t]

        self._decode(state, Prompts(rollout.seq[:, :P], rollout.attention_mask[:, :P]),
                     forced.shape[1], pick)
        return torch.stack(out, 1)

    def _decode(self, state, prompts, G, pick):
        """G tokens, each pick(t, logits (B, V)) from a full forward over the sequence so far;
        the (B, G) answer."""
        m = self.models
        seq, am = prompts
        with common.bound(m.actor, state.actor_params):
            for t in range(G):
                logits = m.actor(input_ids=seq, attention_mask=am, position_ids=position_ids(am),
                                 use_cache=False, logits_to_keep=1).logits[:, -1]     # (B, V)
                seq = torch.cat([seq, pick(t, logits)[:, None]], 1)
                am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        return seq[:, prompts.input_ids.shape[1]:]

    def score(self, state, rollout):
        return common.score(self.models, state, rollout, self.cfg.reward)

    def train_step(self, state, exp, ppo, *, seed):
        return common.train_step(self.models, self.opts, state, exp, ppo)

    def release(self):
        pass


def test_an_engine_registered_at_run_time_runs_every_contract_and_parity_check(
        monkeypatch, tmp_path):
    monkeypatch.setitem(engines.REGISTRY, "recompute",
                        engines.Entry(f"{__name__}:RecomputeEngine"))
    assert "recompute" in registry_names() and "recompute" in engines.available("cpu")
    assert CONTRACT and PARITY
    for check in CONTRACT + PARITY:
        (where := tmp_path / check.__name__).mkdir()
        try:
            check("recompute", where)
        except pytest.skip.Exception as e:   # nothing it needs is missing here
            pytest.fail(f"{check.__name__} skipped the new engine: {e}")
