"""The hybrid engine on the DeepSpeed backend: same tokens and weights as hf on the same
backend, and under ZeRO-3 generation gathers the parameters once."""
from __future__ import annotations

import pytest

import engines
from core.types import PPOConfig

from conftest import lockstep, make_bundle, make_cfg


@pytest.mark.parametrize("stage,lora", [(0, 0), (3, 0), (3, 4)])
def test_hybrid_equals_hf_on_zero(stage, lora):
    """With LoRA under ZeRO-3, hybrid folds the adapters into the gathered weights for each
    generate and restores them before ZeRO re-partitions."""
    ppo = PPOConfig(actor_lr=3e-4, critic_lr=3e-4, eps=1e-6)
    cfg = make_cfg(zero_stage=stage, ppo=ppo, gen={"gen_len": 8}, lora_dim=lora)
    b1, b2 = make_bundle("tiny-opt", 0, lora_dim=lora), make_bundle("tiny-opt", 0, lora_dim=lora)
    hf, hy = engines.get("hf"), engines.get("hybrid", lora_mode="fused")
    lockstep(hf, hf.init(b1, cfg, seed=0), hy, hy.init(b2, cfg, seed=0), b1, cfg, 2,
             f"ZeRO-{stage} lora={lora}")
