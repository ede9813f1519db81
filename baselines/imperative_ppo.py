"""An imperative PPO trainer in the style most RLHF code is written today.

nn.Module calls, torch.optim.AdamW, loss.backward(), Python loops. It is written apart from
core's functions on purpose: core and the engines are checked against it. Greedy generation by
repeated full forwards (no KV cache), so it shares no generation code with any engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ImperativePPO:
    def __init__(self, actor, ref, critic, reward, *, pad_id, kl_coef=0.1, clip_reward=5.0,
                 cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, actor_lr=9.65e-6,
                 critic_lr=5e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        self.actor, self.ref, self.critic, self.reward = actor, ref, critic, reward
        self.pad_id = pad_id
        self.kl_coef, self.clip_reward = kl_coef, clip_reward
        self.cliprange, self.cliprange_value = cliprange, cliprange_value
        self.gamma, self.lam = gamma, lam
        self.actor_opt = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad],
                                           lr=actor_lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        self.critic_opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad],
                                            lr=critic_lr, betas=betas, eps=eps,
                                            weight_decay=weight_decay)

    @staticmethod
    def _positions(mask):
        pos = torch.cumsum(mask, dim=1) - 1
        pos[pos < 0] = 0
        return pos

    def _lm_logits(self, model, seq, mask):
        return model(input_ids=seq, attention_mask=mask,
                     position_ids=self._positions(mask)).logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, new_tokens):
        seq, mask = input_ids, attention_mask
        for _ in range(new_tokens):
            logits = self._lm_logits(self.actor, seq, mask)[:, -1, :]
            nxt = logits.argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        return seq, mask

    @staticmethod
    def _gather_logprobs(logits, labels):
        logp = F.log_softmax(logits.float(), dim=-1)
        return logp.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)

    def step(self, input_ids, attention_mask, new_tokens):
        """One PPO step on one batch; returns (actor_loss, critic_loss) as floats."""
        prompt_len = input_ids.shape[1]
        seq, mask = self.generate(input_ids, attention_mask, new_tokens)
        start = prompt_len - 1
        with torch.no_grad():
            old_logprobs = self._gather_logprobs(self._lm_logits(self.actor, seq, mask)[:, :-1],
                                                 seq[:, 1:])[:, start:]
            ref_logprobs = self._gather_logprobs(self._lm_logits(self.ref, seq, mask)[:, :-1],
                                                 seq[:, 1:])[:, start:]
            old_values = self.critic(seq, mask)[:, :-1][:, start:]
            score = self.reward(seq, mask)[:, -1]

            rewards = -self.kl_coef * (old_logprobs - ref_logprobs)
            rewards[:, -1] += score.clamp(-self.clip_reward, self.clip_reward)
            advantages = torch.zeros_like(rewards)
            lastgaelam = torch.zeros_like(rewards[:, 0])
            for t in reversed(range(rewards.shape[1])):
                next_value = old_values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
                delta = rewards[:, t] + self.gamma * next_value - old_values[:, t]
                lastgaelam = delta + self.gamma * self.lam * lastgaelam
                advantages[:, t] = lastgaelam
            returns = advantages + old_values

        logprobs = self._gather_logprobs(self._lm_logits(self.actor, seq, mask)[:, :-1],
                                         seq[:, 1:])[:, start:]
        ratio = torch.exp(logprobs - old_logprobs)
        pg = torch.max(-advantages * ratio,
                       -advantages * torch.clamp(ratio, 1 - self.cliprange, 1 + self.cliprange))
        actor_loss = pg.mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()

        values = self.critic(seq, mask)[:, :-1][:, start:]
        v_clipped = torch.clamp(values, old_values - self.cliprange_value,
                                old_values + self.cliprange_value)
        critic_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        return float(actor_loss), float(critic_loss), seq
