"""The PPO math of core/ppo.py against hand-computed cases and its slow twins."""
from __future__ import annotations

import math

import pytest
import torch

from core.ppo import actor_loss, critic_loss, gae, gae_loop, kl_rewards, logprobs_from_logits

T, F = True, False


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- GAE

@pytest.mark.parametrize("fn", [gae, gae_loop], ids=["vectorised", "loop"])
def test_gae_hand_full_row(fn):
    # gamma = 1, lam = 0.5; r = [1, 0, 2], V = [0.5, 1.0, 1.5], V past the end = 0
    # delta_2 = 2 + 1*0   - 1.5 = 0.5
    # delta_1 = 0 + 1*1.5 - 1.0 = 0.5
    # delta_0 = 1 + 1*1.0 - 0.5 = 1.5
    # A_2 = 0.5;  A_1 = 0.5 + 0.5*0.5 = 0.75;  A_0 = 1.5 + 0.5*0.75 = 1.875
    # returns = A + V = [2.375, 1.75, 2.0]
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = fn(r, v, torch.ones(1, 3, dtype=torch.bool), 1.0, 0.5)
    _close(adv, [[1.875, 0.75, 0.5]])
    _close(ret, [[2.375, 1.75, 2.0]])


@pytest.mark.parametrize("fn", [gae, gae_loop], ids=["vectorised", "loop"])
def test_gae_hand_masks_of_different_lengths(fn):
    # gamma = 0.9, lam = 0.5 (gamma*lam = 0.45); junk past each mask must not leak in.
    # row 0, 2 valid: r = [1, 3 | 100], V = [1, 2 | 100]; V_2 counts as 0
    #   delta_1 = 3 + 0.9*0 - 2 = 1;  delta_0 = 1 + 0.9*2 - 1 = 1.8
    #   A_1 = 1;  A_0 = 1.8 + 0.45*1 = 2.25;  returns = [3.25, 3.0, 0]
    # row 1, 1 valid: r = [2 | 50, 50], V = [0.5 | 50, 50]
    #   delta_0 = 2 + 0.9*0 - 0.5 = 1.5 = A_0;  returns = [2.0, 0, 0]
    # row 2, 0 valid: everything 0
    # row 3, 3 valid: r = [0, 0, 1], V = [1, 1, 1]
    #   delta_2 = 1 - 1 = 0;  delta_1 = 0 + 0.9 - 1 = -0.1;  delta_0 = -0.1
    #   A_2 = 0;  A_1 = -0.1;  A_0 = -0.1 + 0.45*(-0.1) = -0.145
    #   returns = [0.855, 0.9, 1.0]
    r = torch.tensor([[1.0, 3.0, 100.0], [2.0, 50.0, 50.0], [7.0, 7.0, 7.0], [0.0, 0.0, 1.0]])
    v = torch.tensor([[1.0, 2.0, 100.0], [0.5, 50.0, 50.0], [7.0, 7.0, 7.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[T, T, F], [T, F, F], [F, F, F], [T, T, T]])
    adv, ret = fn(r, v, mask, 0.9, 0.5)
    _close(adv, [[2.25, 1.0, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.145, -0.1, 0.0]])
    _close(ret, [[3.25, 3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.855, 0.9, 1.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_vectorised_equals_loop_random(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, G = 16, 12
    rewards = torch.randn(B, G, generator=g)
    values = torch.randn(B, G, generator=g)
    lengths = torch.randint(0, G + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, G  # always an all-masked row and a full row
    mask = torch.arange(G).expand(B, G) < lengths.unsqueeze(-1)  # random prefix masks
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_l, ret_l = gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_l, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, ret_l, atol=1e-6, rtol=0)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    assert torch.all(adv[0] == 0)


# ----------------------------------------------------------------------------- KL rewards

def test_kl_rewards_hand():
    # kl_coef = 0.1, clip_reward = 5
    # row 0, 3 valid: lp - ref = [0.5, 0, -1] -> [-0.05, 0, 0.1]; score 7 -> +5 at t=2
    # row 1, 2 valid: lp - ref = [1, -0.5 | 8] -> [-0.1, 0.05, 0]; score -7 -> -5 at t=1
    # row 2, 1 valid: lp - ref = [0 | ...] -> [0, 0, 0]; score 2.5 (inside the clip) at t=0
    # row 3, 0 valid: all 0, the score goes nowhere
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-0.2, -3.0, -3.0],
                       [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -0.5, -9.0], [-0.2, -1.0, -1.0],
                        [-4.0, -4.0, -4.0]])
    scores = torch.tensor([7.0, -7.0, 2.5, 3.0])
    mask = torch.tensor([[T, T, T], [T, T, F], [T, F, F], [F, F, F]])
    out = kl_rewards(lp, ref, scores, mask, 0.1, 5.0)
    _close(out, [[-0.05, 0.0, 5.1], [-0.1, -4.95, 0.0], [2.5, 0.0, 0.0], [0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- actor loss

C = 0.2
L15, L05, L11 = math.log(1.5), math.log(0.5), math.log(1.1)


@pytest.mark.parametrize("adv,logratio,expected,clipped", [
    (2.0, L15, -2.4, True),    # A>0, r=1.5 > 1+c: max(-3, -2*1.2=-2.4) -> clipped -2.4
    (-1.0, L05, 0.8, True),    # A<0, r=0.5 < 1-c: max(0.5, 1*0.8=0.8) -> clipped 0.8
    (3.0, L11, -3.3, False),   # r=1.1 inside [0.8, 1.2]: both -3.3
    (1.0, L05, -0.5, False),   # A>0, r=0.5: max(-0.5, -0.8) -> unclipped -0.5
    (-1.0, L15, 1.5, False),   # A<0, r=1.5: max(1.5, 1.2) -> unclipped 1.5
])
def test_actor_loss_branches(adv, logratio, expected, clipped):
    old = torch.tensor([[-2.0]])
    lp = (old + logratio).requires_grad_(True)
    loss = actor_loss(lp, old, torch.tensor([[adv]]), torch.tensor([[True]]), C)
    _close(loss.detach(), expected, atol=1e-5)
    loss.backward()
    # the clipped branch is flat in the log-prob; the unclipped one has slope -A * r
    want_grad = 0.0 if clipped else -adv * math.exp(logratio)
    _close(lp.grad, [[want_grad]], atol=1e-5)


def test_actor_loss_masked_mean():
    # row 0 (3 valid): -2.4 (A>0 clipped), 0.8 (A<0 clipped), -3.3 (unclipped)
    # row 1 (2 valid): -0.5, 1.5; the masked third entry would be -100*2 = -200 if counted
    # mean over the 5 valid tokens: (-2.4 + 0.8 - 3.3 - 0.5 + 1.5) / 5 = -3.9 / 5 = -0.78
    old = torch.full((2, 3), -2.0)
    logratio = torch.tensor([[L15, L05, L11], [L05, L15, math.log(2.0)]])
    adv = torch.tensor([[2.0, -1.0, 3.0], [1.0, -1.0, 100.0]])
    mask = torch.tensor([[T, T, T], [T, T, F]])
    _close(actor_loss(old + logratio, old, adv, mask, C), -0.78, atol=1e-5)


# ----------------------------------------------------------------------------- critic loss

def test_critic_loss_branches_and_mask():
    # cliprange_value = 0.2
    # t0: v=1.5, old=1.0 -> clip 1.2; R=2: (v-R)^2 = 0.25, (1.2-2)^2 = 0.64 -> clipped 0.64
    # t1: v=1.5, old=1.0 -> clip 1.2; R=1: (0.5)^2 = 0.25, (0.2)^2 = 0.04 -> unclipped 0.25
    # t2: v=1.1, old=1.0 -> inside;   R=0: 1.21 both
    # t3: masked (would add (10+10)^2 = 400)
    # loss = 0.5 * (0.64 + 0.25 + 1.21) / 3 = 0.5 * 2.1 / 3 = 0.35
    v = torch.tensor([[1.5, 1.5, 1.1, 10.0]])
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    R = torch.tensor([[2.0, 1.0, 0.0, -10.0]])
    mask = torch.tensor([[T, T, T, F]])
    _close(critic_loss(v, old, R, mask, 0.2), 0.35, atol=1e-5)


@pytest.mark.parametrize("v,old,R,expected,clipped", [
    (1.5, 1.0, 2.0, 0.5 * 0.64, True),    # clipped term larger: grad 0 (clip is flat in v)
    (1.5, 1.0, 1.0, 0.5 * 0.25, False),   # unclipped term larger: grad v - R = 0.5
    (0.5, 1.0, 0.0, 0.5 * 0.64, True),    # below old-c: clip 0.8, (0.8)^2 > (0.5)^2
])
def test_critic_loss_single_branches(v, old, R, expected, clipped):
    vt = torch.tensor([[v]], requires_grad=True)
    loss = critic_loss(vt, torch.tensor([[old]]), torch.tensor([[R]]), torch.tensor([[True]]),
                       0.2)
    _close(loss.detach(), expected, atol=1e-5)
    loss.backward()
    _close(vt.grad, [[0.0 if clipped else v - R]], atol=1e-5)


# ----------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_matches_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 37, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, 37, (3, 5), generator=g)
    out = logprobs_from_logits(logits, tokens)
    want = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
