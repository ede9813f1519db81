"""The naive engine: Hugging Face `generate` on the training module itself, eager.

Sampling uses the Gumbel-max trick with seed-drawn noise added by a logits processor, with
greedy decoding on top, so it samples exactly what any other engine given the same seed samples.
"""
from __future__ import annotations

import torch

from core.engine import check_generate_args
from core.models import ModelBundle
from core.rng import noisy_scores
from core.types import (Experience, GenerationConfig, PPOConfig, Prompts, Rollout, RunConfig,
                        TrainState)

from . import common, kernels, zero


class GumbelNoise:
    """Logits processor: scores / T + Gumbel noise of step t, t counted from the prompt end."""

    def __init__(self, seed: int, prompt_len: int, temperature: float):
        self.seed, self.prompt_len, self.temperature = seed, prompt_len, temperature

    def __call__(self, input_ids, scores):
        return noisy_scores(scores, self.seed, input_ids.shape[1] - self.prompt_len,
                            self.temperature, uniform=kernels.counter_uniform)


def hf_generate(model, prompts: Prompts, gen: GenerationConfig, *, seed: int, pad_id: int,
                eos_id: int, processors=(), **extra) -> Rollout:
    """model.generate with fixed-length answers (unless gen.stop_at_eos); pads to P + G.
    `processors`: logits processors that see each step's logits first."""
    from transformers import GenerationConfig as HFGen, LogitsProcessorList
    B, P = prompts.input_ids.shape
    # no EOS: an empty list, not None; generate fills None fields from the model's own
    # generation config (OPT's eos 2), which stopped rows early and padded them
    cfg = HFGen(max_new_tokens=gen.gen_len, do_sample=False, num_beams=1,  # DeepSpeed reads it
                pad_token_id=pad_id, eos_token_id=eos_id if gen.stop_at_eos else [],
                use_cache=True)
    procs = LogitsProcessorList([*processors, *([] if gen.greedy else
                                                [GumbelNoise(seed, P, gen.temperature)])])
    with torch.no_grad():
        out = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                             generation_config=cfg, logits_processor=procs, **extra)
    answer = out[:, P:]
    if answer.shape[1] < gen.gen_len:  # every row stopped early
        fill = answer.new_full((B, gen.gen_len - answer.shape[1]), pad_id)
        answer = torch.cat([answer, fill], dim=1)
    return common.finish_rollout(prompts, answer, pad_id, eos_id, gen.stop_at_eos)


class HFEngine:
    weight_copies = 1

    def __init__(self, name: str = "hf"):
        self.name = name
        self.models: ModelBundle | None = None

    def init(self, models: ModelBundle, cfg: RunConfig, *, seed: int) -> TrainState:
        self.models, self.cfg = models, cfg
        self.backend = zero.backend_for(cfg)  # torch, or DeepSpeed ZeRO for --zero-stage
        state, self.opts = self.backend.init_state(models, cfg)
        self.gen_kw = zero.generate_kwargs(cfg)
        return state

    def sync(self, state: TrainState) -> None:
        pass  # generation reads the training module: nothing to copy

    def generate(self, state: TrainState, prompts: Prompts, gen: GenerationConfig, *,
                 seed: int) -> Rollout:
        m = self.models
        check_generate_args(prompts, m.config, gen, seed)
        with common.bound(m.actor, state.actor_params):
            return hf_generate(m.actor, prompts, gen, seed=seed, pad_id=m.pad_id,
                               eos_id=m.eos_id, **self.gen_kw)

    def score(self, state: TrainState, rollout: Rollout) -> Experience:
        return common.score(self.models, state, rollout, self.cfg.reward)

    def train_step(self, state: TrainState, exp: Experience, ppo: PPOConfig, *, seed: int):
        return self.backend.train_step(self.models, self.opts, state, exp, ppo)

    def release(self) -> None:
        pass  # HF's dynamic cache lives only inside each generate call
