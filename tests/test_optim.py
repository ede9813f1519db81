"""core.optim.adamw (pure init/update + in-place apply) against torch.optim.AdamW."""
from __future__ import annotations

import pytest
import torch

from core.optim import adamw, apply_updates_, global_norm


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g),
            "s": torch.randn((), generator=g)}


def _grads(step, like):
    g = torch.Generator().manual_seed(100 + step)
    # vary the scale per step so bias correction and the second moment both matter
    return {k: torch.randn(p.shape, generator=g) * (0.1 + step) for k, p in like.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_over_5_steps(weight_decay):
    lr, betas, eps = 1e-2, (0.9, 0.95), 1e-8
    ours = _params(0)
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in ours.items()}
    opt_t = torch.optim.AdamW(list(theirs.values()), lr=lr, betas=betas, eps=eps,
                              weight_decay=weight_decay)
    opt = adamw(lr, betas, eps, weight_decay)
    state = opt.init(ours)
    assert int(state.count) == 0
    start = {k: v.clone() for k, v in ours.items()}
    for step in range(5):
        grads = _grads(step, ours)
        updates, state = opt.update(grads, state, ours)
        apply_updates_(ours, updates)
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        opt_t.step()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k].detach(), atol=1e-6, rtol=0)
            torch.testing.assert_close(state.mu[k], opt_t.state[theirs[k]]["exp_avg"],
                                       atol=1e-6, rtol=0)
            torch.testing.assert_close(state.nu[k], opt_t.state[theirs[k]]["exp_avg_sq"],
                                       atol=1e-6, rtol=0)
    assert int(state.count) == 5
    # the parameters really moved (up to about lr per step), so agreement is not trivial
    assert max(float((ours[k] - start[k]).abs().max()) for k in ours) > 2 * lr


def test_update_is_pure():
    params = _params(1)
    opt = adamw(1e-2, (0.9, 0.95), weight_decay=0.1)
    s0 = opt.init(params)
    before = {k: v.clone() for k, v in params.items()}
    grads = _grads(0, params)
    u1, s1 = opt.update(grads, s0, params)
    u2, s2 = opt.update(grads, s0, params)  # same inputs, same outputs; inputs untouched
    for k in params:
        assert torch.equal(params[k], before[k])
        assert torch.equal(s0.mu[k], torch.zeros_like(params[k]))
        assert torch.equal(s0.nu[k], torch.zeros_like(params[k]))
        assert torch.equal(u1[k], u2[k]) and torch.equal(s1.mu[k], s2.mu[k])
    assert int(s0.count) == 0 and int(s1.count) == 1


def test_apply_updates_in_place_and_global_norm():
    p = {"a": torch.ones(3), "b": torch.zeros(2)}
    ptr = p["a"].data_ptr()
    apply_updates_(p, {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([-1.0, 1.0])})
    assert p["a"].data_ptr() == ptr
    assert torch.equal(p["a"], torch.tensor([2.0, 3.0, 4.0]))
    # sqrt(3^2 + 4^2) = 5
    assert float(global_norm({"x": torch.tensor([3.0]), "y": torch.tensor([[4.0]])})) == 5.0


def test_in_place_update_matches_the_pure_update():
    """Engines train with update_ (in place, donated state); the pure update is the reference."""
    import torch
    from core.optim import adamw, apply_updates_
    gen = torch.Generator().manual_seed(3)
    p_pure = {"a": torch.randn(50, 7, generator=gen), "b": torch.randn(7, generator=gen)}
    p_inpl = {k: v.clone() for k, v in p_pure.items()}
    opt = adamw(1e-2, (0.9, 0.95), 1e-8, weight_decay=0.1)
    s_pure, s_inpl = opt.init(p_pure), opt.init(p_inpl)
    for _ in range(5):
        g = {k: torch.randn(v.shape, generator=gen) for k, v in p_pure.items()}
        u, s_pure = opt.update(g, s_pure, p_pure)
        apply_updates_(p_pure, u)
        s_inpl = opt.update_(g, s_inpl, p_inpl)
    for k in p_pure:
        assert torch.allclose(p_pure[k], p_inpl[k], atol=1e-6, rtol=0)
        assert torch.allclose(s_pure.mu[k], s_inpl.mu[k], atol=1e-7)
        assert torch.allclose(s_pure.nu[k], s_inpl.nu[k], atol=1e-7)
    assert int(s_inpl.count) == 5
