"""Parity with hf: the probe each worker runs, the tolerance, and the run's verdict.

The probe runs through the engine protocol: a greedy `generate` on probe prompts with the
initial weights, `score`, and `answer_logprobs` (the engine's own generation path's log-probs of
a rollout's tokens). A generation-only bundle cannot be scored: there the actor's own forward
stands in for scoring, as it does for the reference's logit scale. The reference engine (hf)
saves its rollout and scoring log-probs; every other engine feeds that same rollout to its own
generation path and to its scoring, and compares both with hf's. Rows, all at step -1 in phase
"parity": logit_scale; gen_max_abs_diff, its generation path's gap (the summary's
parity_max_abs_diff: scoring is torch code every engine shares, so only generation can part
from hf's there); max_abs_diff, its scoring's gap (score_parity_max_abs_diff: ZeRO-3 or a stale
copy could still get that wrong); token_agreement and divergence_margin. An engine without
`answer_logprobs` records no gen_max_abs_diff, and fails the verdict as not measured. The
harness judges them against `parity_tolerance`.
"""
from __future__ import annotations

import math

import torch

from core.ppo import logprobs_from_logits
from core.models import answer_logits
from core.types import Rollout

from .results import atomic_write

DEFAULT_PARITY_TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
# Two correct paths (cached decode against a full-sequence forward, or another kernel) round
# the logits, made in the run's dtype, differently: a log-prob moves by a few spacings of that
# dtype at the size of the largest logits (measured on CPU, opt-1.3b bf16, top logits in [4, 8),
# spacing 2^-5: hf's own cached generate against its own scoring differed by 1.5-2 spacings
# over two runs, hybrid's decode against hf's generate by 2; bench/micro/logit_floor.py). The
# tolerance is at least 4 of them.
LOGIT_SPACINGS = 4
DTYPE_EPS = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
# A greedy answer may leave hf's only at a near-tie: the two tokens within this many times the
# log-prob tolerance (each path's logits may be off by the tolerance, in opposite directions).
TIE_FACTOR = 2.0
REFERENCE = "hf"  # the engine every other is compared with: its own parity is 0 by definition


# ---------------------------------------------------------------- the probe (in each worker)

def probe(emit, engine, state, bundle, prompts, gen, *, seed: int, ref_path: str,
          reference: bool) -> None:
    """Greedy rollout of `prompts` (gen.greedy) by `engine` (initialised on `bundle`), compared
    with the reference's; `emit(metric, value, unit)` records each number as measured."""
    from safetensors.torch import load_file, save_file
    rollout = engine.generate(state, prompts, gen, seed=seed)

    def scored(r):  # the engine's scoring; a generation-only bundle has the actor's part only
        if bundle.ref is None:
            return logprobs_from_logits(_logits(bundle.actor, r), r.seq[:, r.prompt_len:])
        return engine.score(state, r).logprobs

    if reference:
        logprobs = scored(rollout)
        scale = top_logit_scale(bundle.actor, rollout)
        tensors = {"seq": rollout.seq.cpu().contiguous(),
                   "attention_mask": rollout.attention_mask.cpu().contiguous(),
                   "answer_mask": rollout.answer_mask.cpu().contiguous(),
                   "logprobs": logprobs.float().cpu().contiguous(),
                   "logit_scale": torch.tensor(scale)}
        atomic_write(ref_path, lambda tmp: save_file(tensors, tmp))
        emit("logit_scale", scale, "")
        emit("gen_max_abs_diff", 0.0, "nat")
        emit("max_abs_diff", 0.0, "nat")
        emit("token_agreement", 1.0, "")
        emit("divergence_margin", 0.0, "nat")
        return
    ref = load_file(ref_path)
    if "logit_scale" in ref:  # the tolerance the harness applies grows with it
        emit("logit_scale", float(ref["logit_scale"]), "")
    P, device = prompts.input_ids.shape[1], prompts.input_ids.device
    ref_rollout = Rollout(ref["seq"].to(device), ref["attention_mask"].to(device),
                          ref["answer_mask"].to(device), P)

    def gap(logprobs):
        return max_gap(logprobs, ref["logprobs"], ref["answer_mask"])

    on_ref = scored(ref_rollout)
    same = rollout.seq.cpu()[:, P:] == ref["seq"][:, P:]
    emit("max_abs_diff", gap(on_ref), "nat")
    emit("token_agreement", float(same.float().mean()), "")
    emit("divergence_margin", divergence_margin(same, on_ref, scored(rollout)), "nat")
    own_path = getattr(engine, "answer_logprobs", None)
    if own_path is not None:  # its own generation path, fed hf's tokens
        emit("gen_max_abs_diff", gap(own_path(state, ref_rollout)), "nat")


@torch.no_grad()
def _logits(model, rollout) -> torch.Tensor:
    """(B, G, V): the module's own forward at the answer positions only, as scoring keeps them
    (the probe's peak stays scoring's)."""
    return answer_logits(model, rollout.seq, rollout.attention_mask, rollout.prompt_len)


def top_logit_scale(model, rollout) -> float:
    """The largest |top logit| over the rollout's answer positions, from the reference's own
    forward: log-probs of two correct paths disagree by a few spacings of the dtype at that
    size (parity_tolerance)."""
    top = _logits(model, rollout).amax(-1).float().abs()
    return _worst(torch.where(rollout.answer_mask.bool(), top, 0.0))


def _worst(x: torch.Tensor) -> float:
    """The largest value, a NaN counting as the worst (+inf): a broken forward must not pass
    for one that was not measured."""
    return float(torch.nan_to_num(x.float(), nan=float("inf")).max())


def max_gap(logprobs, ref_logprobs, answer_mask) -> float:
    """max |difference| from the reference's log-probs over the valid answer tokens."""
    diff = (logprobs.float().cpu() - ref_logprobs.float().cpu()).abs()
    return _worst(torch.where(answer_mask.cpu().bool(), diff, 0.0))


def divergence_margin(same, on_ref, on_own) -> float:
    """Where a row's greedy answer first leaves hf's, how far apart the two chosen tokens are
    in log-prob (the engine's scoring of both rollouts: the prefixes are equal up to there).
    A correct engine leaves hf's path only at a near-tie, which low-precision rounding flips;
    after that the rest of the row differs, so token agreement alone would blame the engine
    for the tie. The largest margin over rows (0 if no row diverged)."""
    same, on_ref, on_own = same.cpu(), on_ref.float().cpu(), on_own.float().cpu()
    diverged = ~same.all(1)
    if not diverged.any():
        return 0.0
    first = (~same).int().argmax(1, keepdim=True)
    margin = on_ref.gather(1, first) - on_own.gather(1, first)
    return _worst(margin.abs()[diverged.unsqueeze(1)])


# ---------------------------------------------------------------- tolerance and verdict

def dtype_spacing(dtype: str, x: float) -> float:
    """The gap between neighbouring values of `dtype` at magnitude x (x finite, above 0)."""
    return DTYPE_EPS[dtype] * 2.0 ** math.floor(math.log2(x))


def parity_tolerance(dtype: str, logit_scale: float, override: float = 0.0) -> float:
    """Max |log-prob difference| from hf: --parity-tol when given, else the dtype's default or
    LOGIT_SPACINGS spacings of the dtype at the reference's largest |top logit|, whichever is
    larger (a scale not measured, as in runs before it was, leaves the default)."""
    if override:
        return float(override)
    base = DEFAULT_PARITY_TOL[dtype]
    if not 0 < logit_scale < math.inf:  # NaN fails too
        return base
    return max(base, LOGIT_SPACINGS * dtype_spacing(dtype, logit_scale))


def parity_failure(d, tol: float) -> str:
    """The failed status of a summary row whose parity with hf is out of bounds or was not
    measured (NaN: an engine without `answer_logprobs`, a probe cut short), else "". The
    reference (hf) is never out of bounds with itself."""
    if d.engine == REFERENCE:
        return ""
    gen, score = d.parity_max_abs_diff, d.score_parity_max_abs_diff
    missing = [what for what, v in (
        ("log-probs from its generation path (answer_logprobs)", gen),
        ("log-probs from its scoring", score),
        ("greedy divergence margin", d.parity_divergence_margin)) if v != v]
    if missing:
        return f"failed: parity with hf not measured: no {', no '.join(missing)}"
    worst, tie = max(gen, score), TIE_FACTOR * tol
    if not (worst > tol or d.parity_divergence_margin > tie):
        return ""
    return (f"failed: parity with hf: max |logprob diff| {worst:.3g} (scoring {score:.3g}, "
            f"generation {gen:.3g}; tol {tol:g}), greedy divergence margin "
            f"{d.parity_divergence_margin:.3g} (max {tie:g}; token agreement "
            f"{d.parity_token_agreement:.3f})")


def verdict(summary, dtype: str, override: float = 0.0) -> tuple[dict, dict]:
    """The run's verdict over the summary table: engine -> failed status for each "ok" row out
    of bounds, and the tolerance results.json keeps. Every engine reads the same reference, so
    one scale (hf's largest |top logit|) and one tolerance serve the run."""
    failed = {d.engine: why for d in summary.itertuples()
              if d.status == "ok" and (why := parity_failure(d, d.parity_tol))}
    scale = summary.parity_logit_scale.max()  # NaN where none was recorded
    tol = parity_tolerance(dtype, scale, override)
    return failed, dict(max_abs_diff=tol, max_divergence_margin=TIE_FACTOR * tol,
                        logit_scale=scale if scale == scale else None)
