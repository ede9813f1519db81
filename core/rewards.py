"""Reward signals: the reward model's score, or a rule for learning tests."""
from __future__ import annotations

from torch import Tensor

from .ppo import last_valid_index


def model_score(values: Tensor, answer_mask: Tensor, prompt_len: int) -> Tensor:
    """Reward-model values (B, T) -> (B,): the value at each answer's last valid token."""
    idx = prompt_len + last_valid_index(answer_mask)
    return values.gather(-1, idx.unsqueeze(-1)).squeeze(-1).float()


def rule_score(answer: Tensor, answer_mask: Tensor, modulus: int = 8) -> Tensor:
    """Share of valid answer tokens whose id is a multiple of `modulus`, times 5 (in [0, 5])."""
    hit = (answer % modulus == 0) & answer_mask
    return 5.0 * hit.float().sum(-1) / answer_mask.float().sum(-1).clamp(min=1.0)
