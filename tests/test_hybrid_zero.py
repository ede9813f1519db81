"""The hybrid engine on the DeepSpeed backend: same tokens and weights as hf on the same
backend, and under ZeRO-3 generation gathers the parameters once."""
from __future__ import annotations

import pytest
import torch

import engines
from core.step import ppo_step
from core.types import PPOConfig

from conftest import make_bundle, make_cfg, make_prompts


@pytest.mark.parametrize("stage,lora", [(0, 0), (3, 0), (3, 4)])
def test_hybrid_equals_hf_on_zero(stage, lora):
    """With LoRA under ZeRO-3, hybrid folds the adapters into the gathered weights for each
    generate and restores them before ZeRO re-partitions."""
    ppo = PPOConfig(actor_lr=3e-4, critic_lr=3e-4, eps=1e-6)
    cfg = make_cfg(zero_stage=stage, ppo=ppo, gen={"gen_len": 8}, lora_dim=lora)
    b1, b2 = make_bundle("tiny-opt", 0, lora_dim=lora), make_bundle("tiny-opt", 0, lora_dim=lora)
    hf, hy = engines.get("hf"), engines.get("hybrid", lora="fused")
    s1, s2 = hf.init(b1, cfg, seed=0), hy.init(b2, cfg, seed=0)
    for step in range(2):
        prompts = make_prompts(b1, cfg, seed=step)
        r1 = hf.generate(s1, prompts, cfg.gen, seed=step)
        r2 = hy.generate(s2, prompts, cfg.gen, seed=step)
        assert torch.equal(r1.seq, r2.seq), f"ZeRO-{stage} step {step}"
        s1, m1 = ppo_step(hf, s1, prompts, cfg, seed=step)
        s2, m2 = ppo_step(hy, s2, prompts, cfg, seed=step)
        assert abs(float(m1.actor_loss) - float(m2.actor_loss)) < 1e-5
