"""Tensors travel in NamedTuples, configuration in frozen dataclasses.

Shapes: B batch, P prompt length, G answer (generated) length, T = P + G.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor


class Prompts(NamedTuple):
    """Left-padded prompts.

    input_ids: (B, P) int64, pad id on the left.
    attention_mask: (B, P) int64, 0 on padding, 1 on prompt tokens.
    """
    input_ids: Tensor
    attention_mask: Tensor


class Rollout(NamedTuple):
    """What generation returns.

    seq: (B, T) int64, prompt then exactly G answer tokens (pad after an EOS stop).
    attention_mask: (B, T) int64, prompt mask then answer_mask.
    answer_mask: (B, G) bool, True on valid answer tokens (a prefix of each row).
    prompt_len: P.
    """
    seq: Tensor
    attention_mask: Tensor
    answer_mask: Tensor
    prompt_len: int


class Experience(NamedTuple):
    """A scored rollout; per-token tensors are over answer positions.

    seq, attention_mask, answer_mask, prompt_len: as in Rollout.
    logprobs, ref_logprobs, values: (B, G) float32; log-prob of answer token j under the actor
      / reference, and the critic value at the position that emits it.
    scores: (B,) float32, reward model (or rule) score of each answer.
    advantages, returns: (B, G) float32, filled by core.step.add_advantages.
    """
    seq: Tensor
    attention_mask: Tensor
    answer_mask: Tensor
    prompt_len: int
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None


class TrainState(NamedTuple):
    """Everything that changes during training. Donated by train_step.

    actor_params / critic_params: name -> trainable tensor. For the torch backend these are the
      modules' own parameters (one copy of the weights); an engine whose training runs elsewhere
      (DeepSpeed) keeps the live weights there and may hold handles here.
    actor_opt / critic_opt: optimiser states (core.optim.AdamState or backend-owned); None
      when RunConfig.train is False (torch backend, and DeepSpeed at ZeRO-0 and 3).
    step: 0-d int64 tensor, optimiser steps done (one per train_step).
    """
    actor_params: dict
    critic_params: dict
    actor_opt: Any
    critic_opt: Any
    step: Tensor


class Metrics(NamedTuple):
    """0-d float32 tensors, averaged over the step's train calls."""
    actor_loss: Tensor
    critic_loss: Tensor
    reward: Tensor       # mean reward-model score of the answers
    kl: Tensor           # mean (logprob - ref_logprob) over valid answer tokens
    returns: Tensor      # mean return over valid answer tokens
    grad_norm_actor: Tensor
    grad_norm_critic: Tensor


@dataclass(frozen=True)
class GenerationConfig:
    gen_len: int = 16
    greedy: bool = False
    temperature: float = 1.0     # > 0; greedy decoding is greedy=True, not temperature 0
    stop_at_eos: bool = False

    def __post_init__(self):
        if not (isinstance(self.gen_len, numbers.Integral) and not isinstance(self.gen_len, bool)
                and self.gen_len >= 1):
            raise ValueError(f"GenerationConfig: gen_len must be an int of at least 1, got "
                             f"{self.gen_len!r}")
        t = self.temperature
        if not (isinstance(t, numbers.Real) and not isinstance(t, bool) and 0 < t < math.inf):
            raise ValueError(f"GenerationConfig: temperature must be a positive finite number "
                             f"(greedy=True for greedy decoding), got {self.temperature!r}")


@dataclass(frozen=True)
class PPOConfig:
    """DeepSpeed-Chat step-3 defaults."""
    kl_coef: float = 0.1
    clip_reward: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 1
    generation_batches: int = 1
    minibatches: int = 1          # minibatches per epoch over the buffer
    grad_accum: int = 1           # micro-batches per optimiser step inside train_step
    actor_lr: float = 9.65e-6
    critic_lr: float = 5e-6
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0


# how `hybrid` runs LoRA adapters in generation: folded into the weights, unfused, or folded
# for long enough answers (engines.hybrid.HybridEngine.LORA_FUSE_MIN_TOKENS)
LORA_MODES = ("auto", "fused", "unfused")


@dataclass(frozen=True)
class RunConfig:
    preset: str = "tiny-opt"
    batch: int = 4
    prompt_len: int = 16
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward: str = "model"          # "model" or "rule"
    lora_dim: int = 0
    zero_stage: int = -1           # -1: plain torch training; 0..3: DeepSpeed ZeRO
    offload: bool = False
    grad_ckpt: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    train: bool = True             # False: nothing trains (a generation-only run), so no
                                   # optimiser state (ZeRO-1 and 2 still need DeepSpeed's)

    def replace(self, **kw) -> "RunConfig":
        return replace(self, **kw)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
