"""Plain functions every torch-trained engine shares: the state's weights bound to the modules,
scoring and the functional train step."""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.func import functional_call, grad_and_value

from core import ppo as P
from core.engine import check_train_args, donate_
from core.guards import check_finite, check_grads
from core.models import ModelBundle, answer_logits, trainable
from core.optim import adamw, global_norm
from core.rewards import model_score, rule_score
from core.step import experience_stats, split_rows
from core.types import Experience, Metrics, PPOConfig, Rollout, RunConfig, TrainState


def answer_values(model, seq, attention_mask, prompt_len: int, params=None):
    """Critic values at the positions that emit answer tokens: (B, G)."""
    kw = dict(input_ids=seq, attention_mask=attention_mask)
    v = model(**kw) if params is None else functional_call(model, params, (), kw, strict=False)
    return v[:, prompt_len - 1:-1]


def answer_mask_from(answer: torch.Tensor, eos_id: int, stop_at_eos: bool) -> torch.Tensor:
    """(B, G) bool: all True, or True up to and including each row's first EOS."""
    if not stop_at_eos:
        return torch.ones_like(answer, dtype=torch.bool)
    is_eos = (answer == eos_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def finish_rollout(prompts, answer: torch.Tensor, pad_id: int, eos_id: int,
                   stop_at_eos: bool) -> Rollout:
    """Prompts + (B, G) generated tokens -> Rollout: tokens after a row's EOS become padding
    and leave the attention mask."""
    amask = answer_mask_from(answer, eos_id, stop_at_eos)
    answer = torch.where(amask, answer, torch.full_like(answer, pad_id))
    seq = torch.cat([prompts.input_ids, answer], dim=1)
    attn = torch.cat([prompts.attention_mask, amask.long()], dim=1)
    return Rollout(seq, attn, amask, prompts.input_ids.shape[1])


@contextlib.contextmanager
def bound(module, params: dict):
    """`module` computes with `params` (a state's name -> tensor: every trainable parameter's
    name) inside the block, and with its own tensors again after it, however the block ends. A
    state from this engine's init or train_step holds the module's own tensors: then nothing
    moves (no copy, no swap). Tied slots (an lm_head sharing the embedding) take the same
    tensor; binding what is already bound changes nothing."""
    if module is None:
        yield
        return
    # the trainable ones, and any other the state names (a bound tensor need not require grad)
    own = {n: p for n, p in module.named_parameters() if p.requires_grad or n in params}
    if params.keys() != own.keys():
        odd = sorted(params.keys() ^ own.keys())
        raise ValueError(f"this state's parameters are not this model's ({len(odd)} names "
                         f"differ, e.g. {odd[0]!r}); pass a state over a bundle built as this "
                         f"engine's")
    new = {id(p): params[k] for k, p in own.items() if params[k] is not p}
    if not new:
        yield
        return
    for k, p in own.items():
        t = params[k]
        if t is not p and hasattr(p, "ds_id"):
            raise ValueError("another state's weights cannot be bound under ZeRO-3 (its "
                             "parameters are partitioned): pass the state this engine's init "
                             "or train_step returned")
        if t is not p and (t.shape, t.dtype, t.device) != (p.shape, p.dtype, p.device):
            raise ValueError(f"this state's {k} is {tuple(t.shape)} {t.dtype} on {t.device}, "
                             f"the model's {tuple(p.shape)} {p.dtype} on {p.device}")
    swapped = []   # (submodule, slot, own tensor)
    try:
        for m in module.modules():
            for slot, p in m._parameters.items():
                if p is not None and id(p) in new:
                    swapped.append((m, slot, p))
                    m._parameters[slot] = new[id(p)]
        yield
    finally:
        for m, slot, p in reversed(swapped):
            m._parameters[slot] = p


def owns(module, params: dict) -> bool:
    """Whether `params` are the module's own tensors (a state from this engine's init or
    train_step), so that `bound` would move nothing."""
    own = dict(module.named_parameters())
    return all(own.get(k) is t for k, t in params.items())


def stamp(tensors) -> tuple:
    """Which tensors, and how often each was written in place (torch counts it): a copy made
    from `tensors` is current while `unchanged(stamp, tensors)`. Weak references: a stamp
    keeps nothing alive, and a new tensor at a freed one's address is another tensor."""
    return tuple((weakref.ref(t), t._version) for t in tensors)


def unchanged(old: tuple, tensors) -> bool:
    ts = list(tensors)
    return len(ts) == len(old) and all(r() is t and v == t._version
                                       for (r, v), t in zip(old, ts))


GENERATION_ONLY = ("score: this bundle has the actor alone (a generation-only run): no "
                   "reference, critic or reward model to score with")


@torch.no_grad()
def actor_logprobs(models: ModelBundle, rollout: Rollout) -> torch.Tensor:
    """(B, G) log-probs of the rollout's answer tokens under the actor (as bound): scoring's
    first part, and all of it that a generation-only bundle can compute."""
    seq, am, P_ = rollout.seq, rollout.attention_mask, rollout.prompt_len
    return P.logprobs_from_logits(answer_logits(models.actor, seq, am, P_), seq[:, P_:])


@torch.no_grad()
def score(models: ModelBundle, state: TrainState, rollout: Rollout, reward: str) -> Experience:
    """The rollout scored with the state's actor and critic (the frozen reference and reward
    are the bundle's)."""
    if models.ref is None:
        raise ValueError(GENERATION_ONLY)
    seq, am, P_ = rollout.seq, rollout.attention_mask, rollout.prompt_len
    answer = seq[:, P_:]
    with bound(models.actor, state.actor_params), bound(models.critic, state.critic_params):
        logprobs = actor_logprobs(models, rollout)
        values = answer_values(models.critic, seq, am, P_)
    ref_logprobs = P.logprobs_from_logits(answer_logits(models.ref, seq, am, P_), answer)
    if reward == "rule":
        scores = rule_score(answer, rollout.answer_mask)
    else:
        scores = model_score(models.reward(seq, am), rollout.answer_mask, P_)
    return Experience(seq, am, rollout.answer_mask, P_, logprobs, ref_logprobs, values, scores)


def init_state(models: ModelBundle, cfg: RunConfig) -> tuple[TrainState, tuple]:
    """TrainState over the modules' own trainable tensors, and the two optimisers (their
    states None with cfg.train False; no critic tensors in a generation-only bundle)."""
    ppo = cfg.ppo
    a_opt = adamw(ppo.actor_lr, ppo.betas, ppo.eps, ppo.weight_decay)
    c_opt = adamw(ppo.critic_lr, ppo.betas, ppo.eps, ppo.weight_decay)
    a_params = trainable(models.actor)
    c_params = trainable(models.critic) if models.critic is not None else {}
    # a run that never trains holds no optimiser state: Adam's moments (and bf16's fp32
    # masters) are 8-12 bytes per parameter
    a_state, c_state = (a_opt.init(a_params), c_opt.init(c_params)) if cfg.train else (None, None)
    state = TrainState(a_params, c_params, a_state, c_state, torch.zeros((), dtype=torch.int64))
    return state, (a_opt, c_opt)


def _actor_loss(params, model, exp: Experience, cliprange):
    logits = answer_logits(model, exp.seq, exp.attention_mask, exp.prompt_len, params)
    logprobs = P.logprobs_from_logits(logits, exp.seq[:, exp.prompt_len:])
    return P.actor_loss(logprobs, exp.logprobs, exp.advantages, exp.answer_mask, cliprange)


def _critic_loss(params, model, exp: Experience, cliprange_value):
    values = answer_values(model, exp.seq, exp.attention_mask, exp.prompt_len, params)
    return P.critic_loss(values, exp.values, exp.returns, exp.answer_mask, cliprange_value)


def _grads(loss_fn, params, model, exp, clip, accum):
    """Gradient of loss_fn averaged over `accum` micro-batches of exp, and the mean loss."""
    from core.step import take
    total, loss_sum = None, 0.0
    n = exp.seq.shape[0]
    for rows in split_rows(n, accum):
        with torch.no_grad():  # keep grads off the outer tape: the params require grad
            g, loss = grad_and_value(loss_fn)(params, model, take(exp, torch.arange(n)[rows]),
                                              clip)
        total = g if total is None else {k: total[k] + g[k] for k in g}
        loss_sum = loss_sum + loss.detach()
    k = len(split_rows(n, accum))
    return {n_: v / k for n_, v in total.items()}, loss_sum / k


def train_step(models: ModelBundle, opts, state: TrainState, exp: Experience, ppo: PPOConfig
               ) -> tuple[TrainState, Metrics]:
    """Actor PPO-clip step and critic clipped-value step; one optimiser step each.

    Both gradients are taken and checked before either update, so a NaN/inf loss or gradient
    raises NonFiniteError with every weight and optimiser state as it was. (The critic's loss
    does not read the actor's weights, so taking it first changes nothing.)
    """
    a_opt, c_opt = opts
    check_train_args(state, exp, models)
    a_grads, a_loss = _grads(_actor_loss, state.actor_params, models.actor, exp, ppo.cliprange,
                             ppo.grad_accum)
    c_grads, c_loss = _grads(_critic_loss, state.critic_params, models.critic, exp,
                             ppo.cliprange_value, ppo.grad_accum)
    a_norm, c_norm = global_norm(a_grads), global_norm(c_grads)
    check_finite("train", actor_loss=a_loss, critic_loss=c_loss)
    check_grads("train", "actor gradient", a_grads, a_norm)
    check_grads("train", "critic gradient", c_grads, c_norm)
    # in place on the donated state (core.optim's pure `update` is the checked reference)
    a_state = a_opt.update_(a_grads, state.actor_opt, state.actor_params)
    c_state = c_opt.update_(c_grads, state.critic_opt, state.critic_params)
    stats = experience_stats(exp)
    metrics = Metrics(a_loss, c_loss, stats["reward"], stats["kl"], stats["returns"],
                      a_norm, c_norm)
    new = state._replace(actor_opt=a_state, critic_opt=c_state, step=state.step + 1)
    donate_(state)
    return new, metrics
