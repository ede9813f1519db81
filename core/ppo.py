"""The PPO math of DeepSpeed-Chat step 3, as pure functions.

Per-token tensors are over answer positions, shape (B, G); `mask` is bool (B, G), True on valid
answer tokens, a contiguous prefix of each row.
"""
from __future__ import annotations

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens]: (B, T, V), (B, T) -> (B, T), computed in float32."""
    logits = logits.float()
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def last_valid_index(mask: Tensor) -> Tensor:
    """(B, G) bool -> (B,) index of each row's last True (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def kl_rewards(logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor,
               kl_coef: float, clip_reward: float) -> Tensor:
    """-kl_coef * (logp - ref_logp) on valid tokens, plus the clipped score on the last one."""
    mask_f = mask.float()
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask_f
    bonus = scores.float().clamp(-clip_reward, clip_reward)  # (B,)
    has_any = mask.any(-1)
    idx = last_valid_index(mask).unsqueeze(-1)  # (B, 1)
    add = torch.zeros_like(rewards).scatter(-1, idx, (bonus * has_any).unsqueeze(-1))
    return rewards + add


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over answer positions; returns (advantages, returns).

    Values and rewards past the mask count as 0; no whitening.
    """
    mask_f = mask.float()
    r = rewards * mask_f
    v = values * mask_f
    G = r.shape[-1]
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=-1)
    delta = r + gamma * next_v - v  # (B, G)
    adv = torch.zeros_like(delta)
    running = torch.zeros_like(delta[:, 0])
    for t in range(G - 1, -1, -1):  # a G-step recurrence; vectorised over the batch
        running = delta[:, t] + gamma * lam * running
        adv[:, t] = running
    adv = adv * mask_f
    return adv, adv + v


def gae_loop(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
             ) -> tuple[Tensor, Tensor]:
    """The slow twin of `gae`: plain Python over every row and position."""
    B, G = rewards.shape
    adv = [[0.0] * G for _ in range(B)]
    ret = [[0.0] * G for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(G)):
            if t >= n:
                continue
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + float(values[b, t])
    return torch.tensor(adv), torch.tensor(ret)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    # where, not x * mask: a per-token loss past the mask that overflowed to inf would give
    # inf * 0 = NaN. Same values and gradients as the product wherever that is finite.
    return torch.where(mask.bool(), x, 0.0).sum() / mask.float().sum().clamp(min=1.0)


def actor_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
               cliprange: float) -> Tensor:
    """PPO-clip: token mean over the mask of max(-A r, -A clip(r, 1-c, 1+c))."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.maximum(loss1, loss2), mask)


def critic_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                cliprange_value: float) -> Tensor:
    """Clipped value loss: 0.5 * token mean of max((v-R)^2, (clip(v, old+-c)-R)^2)."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)
