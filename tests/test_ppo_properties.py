"""Property tests (hypothesis) for the PPO math in core/ppo.py.

Every example draws a batch shape, a prefix mask per row (lengths 0..G, so empty and full rows
occur), a magnitude (1e-30 .. 1e30) and a seed; tensors are drawn from the seed. Values past the
mask are junk of the same magnitude, which every function must ignore.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from core.ppo import actor_loss, critic_loss, gae, gae_loop, kl_rewards, masked_mean

# derandomize: CI sees the same examples every run; database=None: no .hypothesis/ folder
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)
SCALES = [1e-30, 1e-3, 1.0, 1e3, 1e30]
EPS32 = torch.finfo(torch.float32).eps


@st.composite
def batches(draw):
    """(mask (B, G) bool prefix per row, scale, torch.Generator)."""
    B, G = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(0, G), min_size=B, max_size=B))
    mask = torch.arange(G).expand(B, G) < torch.tensor(lengths).unsqueeze(-1)
    scale = draw(st.sampled_from(SCALES))
    return mask, scale, torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))


def randn(g, mask, scale=1.0):
    return scale * torch.randn(mask.shape, generator=g)


def junk_past_mask(x, mask, g, scale):
    """x with every position past the mask replaced by other values of the same magnitude."""
    return torch.where(mask, x, scale * 7 * torch.randn(x.shape, generator=g))


def finite(*xs):
    return all(bool(torch.isfinite(x).all()) for x in xs)


# ----------------------------------------------------------------------------- actor

def actor_case(mask, scale, g):
    """Log-ratios within +-1 (ratios on both sides of the clip range), advantages at `scale`."""
    logprobs = torch.rand(mask.shape, generator=g) * -5
    old = logprobs + (2 * torch.rand(mask.shape, generator=g) - 1)
    return logprobs, old, randn(g, mask, scale)


def actor_grad(logprobs, old, adv, mask, c):
    lp = logprobs.clone().requires_grad_(True)
    loss = actor_loss(lp, old, adv, mask, c)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


@SETTINGS
@given(batches(), st.sampled_from([0.1, 0.2, 0.3]))
def test_actor_loss_finite_masked_and_clipped_grad_zero(case, c):
    mask, scale, g = case
    logprobs, old, adv = actor_case(mask, scale, g)
    loss, grad = actor_grad(logprobs, old, adv, mask, c)
    assert finite(loss, grad)
    if not mask.any():  # all rows empty: nothing to learn from
        assert loss == 0 and not grad.any()

    # junk past the mask changes neither the loss nor the gradient, bit for bit
    loss_j, grad_j = actor_grad(junk_past_mask(logprobs, mask, g, 1.0),
                                junk_past_mask(old, mask, g, 1.0),
                                junk_past_mask(adv, mask, g, scale), mask, c)
    assert torch.equal(loss, loss_j) and torch.equal(grad, grad_j)
    assert not grad[~mask].any()

    # where the clipped branch is strictly the larger one the ratio is out of range and the
    # token contributes no gradient; elsewhere it gets the unclipped -A * ratio / n
    ratio = torch.exp(logprobs - old)
    clipped = -adv * ratio.clamp(1 - c, 1 + c) > -adv * ratio
    assert not grad[clipped & mask].any()
    free = mask & ~clipped
    n = mask.sum().clamp(min=1)
    torch.testing.assert_close(grad[free], (-adv * ratio)[free] / n, rtol=1e-5, atol=0)


@SETTINGS
@given(batches(), st.floats(-0.5, 0.5).filter(lambda d: abs(d) > 1e-3))
def test_actor_loss_at_the_clip_boundary(case, d):
    """Ratios exactly at 1+c (or 1-c): both branches are equal, the loss is the unclipped
    one, and the gradient is finite and still the unclipped one (clamp passes the boundary)."""
    mask, scale, g = case
    logprobs = torch.full(mask.shape, d)
    old = torch.zeros(mask.shape)
    r = float(torch.exp(torch.tensor(d)))  # the float32 ratio every token has
    c = abs(r - 1.0)                        # so 1 + c (or 1 - c) is exactly r in float32
    assert float(torch.tensor(1.0 + c if r > 1 else 1.0 - c, dtype=torch.float32)) == r
    adv = randn(g, mask, scale)
    loss, grad = actor_grad(logprobs, old, adv, mask, c)
    assert finite(loss, grad)
    unclipped = masked_mean(-adv * r, mask)
    torch.testing.assert_close(loss, unclipped, rtol=1e-6, atol=0)
    n = mask.sum().clamp(min=1)
    torch.testing.assert_close(grad[mask], (-adv * r)[mask] / n, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- critic

@SETTINGS
@given(batches(), st.sampled_from([0.1, 0.2, 1.0]))
def test_critic_loss_nonnegative_finite_masked(case, c):
    mask, scale, g = case
    old = randn(g, mask, scale)
    values = old + randn(g, mask, scale)
    returns = randn(g, mask, scale)
    v = values.clone().requires_grad_(True)
    loss = critic_loss(v, old, returns, mask, c)
    (grad,) = torch.autograd.grad(loss, v)
    assert loss >= 0 and not loss.isnan() and finite(grad)
    if scale <= 1e18:  # beyond that a squared error overflows float32 to inf (never NaN)
        assert finite(loss)
    assert not grad[~mask].any()
    loss_j = critic_loss(junk_past_mask(values, mask, g, scale), junk_past_mask(old, mask, g,
                         scale), junk_past_mask(returns, mask, g, scale), mask, c)
    assert torch.equal(loss.detach(), loss_j)


# ----------------------------------------------------------------------------- rewards, GAE

@SETTINGS
@given(batches(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_kl_rewards_and_gae(case, gamma, lam):
    mask, scale, g = case
    logprobs, ref = randn(g, mask) - 3, randn(g, mask) - 3
    scores = scale * torch.randn(mask.shape[0], generator=g)
    rewards = kl_rewards(logprobs, ref, scores, mask, 0.1, 5.0)
    assert finite(rewards) and not rewards[~mask].any()
    junk = kl_rewards(junk_past_mask(logprobs, mask, g, scale), junk_past_mask(ref, mask, g,
                      scale), scores, mask, 0.1, 5.0)
    assert torch.equal(rewards, junk)
    # the clipped score sits on each non-empty row's last valid token
    last = mask.sum(-1) - 1
    rows = last >= 0
    kl_part = -0.1 * (logprobs - ref)
    bonus = rewards[rows, last[rows]] - kl_part[rows, last[rows]]
    torch.testing.assert_close(bonus, scores[rows].clamp(-5, 5), rtol=1e-5, atol=1e-6)

    values = randn(g, mask, scale)
    rewards = randn(g, mask, scale)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert finite(adv, ret)
    assert not adv[~mask].any() and not ret[~mask].any()
    adv_j, ret_j = gae(junk_past_mask(rewards, mask, g, scale),
                       junk_past_mask(values, mask, g, scale), mask, gamma, lam)
    assert torch.equal(adv, adv_j) and torch.equal(ret, ret_j)
    # returns are advantages + values exactly; returns - values recovers the advantages up to
    # one float32 rounding of the sum (tiny advantages vanish next to large values)
    assert torch.equal(ret[mask], (adv + values)[mask])
    err = ((ret - values) - adv)[mask].abs()
    assert (err <= 2 * EPS32 * (adv.abs() + values.abs())[mask]).all()

    # the slow twin, in float64; float32 rounding grows with G terms of the largest magnitude
    adv_l, ret_l = gae_loop(rewards, values, mask, gamma, lam)
    tol = 1e-5 * scale * mask.shape[1]
    torch.testing.assert_close(adv, adv_l, rtol=1e-5, atol=tol)
    torch.testing.assert_close(ret, ret_l, rtol=1e-5, atol=tol)
