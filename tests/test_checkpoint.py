"""Checkpoint and resume: 6 steps == 3 steps, saved, loaded into fresh models, 3 more; bit for bit.

Per-step seeds come from (base seed, step index) as in bench.worker: prompts
fold_in(BASE, 100, step, 0) and the step's sampling/shuffle seed fold_in(BASE, step), so a
resumed run picks up the same seed stream at step 3 instead of restarting it.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import engines
from core import checkpoint as ckpt
from core.checkpoint import CheckpointError
from core.rng import fold_in
from core.step import ppo_step

from conftest import make_bundle, make_cfg, make_prompts, record_sequences

BASE = 7
# Large learning rates so every step moves the weights well past float32 rounding; two epochs
# of two minibatches so optimiser steps (4 per PPO step) differ from PPO steps and the seeded
# shuffle is exercised.
CFG = make_cfg(ppo=dict(actor_lr=1e-3, critic_lr=1e-3, ppo_epochs=2, minibatches=2))


def fresh(name: str):
    bundle = make_bundle("tiny-opt", seed=0)
    eng = engines.get(name)
    return bundle, eng, eng.init(bundle, CFG, seed=BASE)


def run(eng, bundle, state, steps, seed_of=lambda s: fold_in(BASE, s)):
    """PPO steps `steps`; returns the state, each step's metrics and sampled tokens."""
    metrics, tokens = [], record_sequences(eng)
    for s in steps:
        prompts = make_prompts(bundle, CFG, seed=fold_in(BASE, 100, s, 0))
        state, m = ppo_step(eng, state, prompts, CFG, seed=seed_of(s))
        metrics.append(m)
    del eng.generate
    return state, metrics, tokens


def save(path, state, bundle, step):
    ckpt.save(str(path), state, bundle, seed=BASE, step=step,
              config_dict=dataclasses.asdict(CFG))


def assert_same_params(a, b):
    for m in ("actor", "critic"):
        pa, pb = dict(getattr(a, m).named_parameters()), dict(getattr(b, m).named_parameters())
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), f"{m}.{k}"


@pytest.mark.parametrize("name", ["hf", "hybrid"])
def test_resume_is_bit_exact(tmp_path, name):
    b6, e6, s6 = fresh(name)
    s6, m6, tok6 = run(e6, b6, s6, range(6))

    b3, e3, s3 = fresh(name)
    s3, m3a, tok3a = run(e3, b3, s3, range(3))
    save(tmp_path, s3, b3, step=3)
    del b3, e3, s3

    br, er, _ = fresh(name)  # fresh models and engine; the checkpoint overwrites the init
    sr, meta = ckpt.load_(str(tmp_path), br)
    assert meta["step"] == 3 and meta["seed"] == BASE and meta["config"]["batch"] == CFG.batch
    own = dict(br.actor.named_parameters())
    assert all(sr.actor_params[k] is own[k] for k in sr.actor_params)  # still one copy
    sr, m3b, tok3b = run(er, br, sr, range(meta["step"], 6))

    assert_same_params(b6, br)
    assert int(sr.step) == int(s6.step) == 6 * 4
    for k in s6.actor_opt.mu:
        assert torch.equal(s6.actor_opt.mu[k], sr.actor_opt.mu[k])
        assert torch.equal(s6.actor_opt.nu[k], sr.actor_opt.nu[k])
    assert int(sr.critic_opt.count) == int(s6.critic_opt.count)
    for a, b in zip(m6, m3a + m3b):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(tok6, tok3a + tok3b))


def test_restarting_the_seed_stream_is_detected(tmp_path):
    """The control for the test above: resuming with the seeds of steps 0..2 again (what a
    resume that forgot the step index would do) samples other tokens and ends elsewhere."""
    b6, e6, s6 = fresh("hf")
    s6, _, tok6 = run(e6, b6, s6, range(6))
    b3, e3, s3 = fresh("hf")
    s3, _, _ = run(e3, b3, s3, range(3))
    save(tmp_path, s3, b3, step=3)
    br, er, _ = fresh("hf")
    sr, _ = ckpt.load_(str(tmp_path), br)
    _, _, tok = run(er, br, sr, range(3, 6), seed_of=lambda s: fold_in(BASE, s - 3))
    assert not torch.equal(tok[0][:, CFG.prompt_len:], tok6[3][:, CFG.prompt_len:])
    assert not torch.equal(br.actor.lm_head.weight, b6.actor.lm_head.weight)


# ----------------------------------------------------------------------------- files

@pytest.fixture
def saved(tmp_path):
    bundle, eng, state = fresh("hf")
    save(tmp_path, state, bundle, step=0)
    return tmp_path, bundle


def test_overwrite_keeps_one_tensors_file_and_crash_keeps_old(saved, monkeypatch):
    path, bundle = saved
    state, _ = ckpt.load_(str(path), bundle)
    save(path, state, bundle, step=1)
    kept = json.loads((path / "meta.json").read_text())["tensors"]
    assert sorted(os.listdir(path)) == ["meta.json", kept]  # the old tensors file is gone

    # a crash at the commit point (meta.json's rename), after the new tensors file is written:
    # the step-1 checkpoint stays whole and loadable; the orphan goes with the next save
    replace = os.replace

    def boom(src, dst):
        if dst.endswith("meta.json"):
            raise OSError("killed")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="killed"):
        save(path, state, bundle, step=2)
    monkeypatch.undo()
    assert not [n for n in os.listdir(path) if ".tmp-" in n]  # no temporary files left
    assert ckpt.load_(str(path), make_bundle("tiny-opt", seed=0))[1]["step"] == 1
    save(path, state, bundle, step=3)
    assert len(os.listdir(path)) == 2


def _one_line(e):
    assert "\n" not in str(e.value) and str(e.value)


def test_missing_or_malformed_checkpoints_raise_one_line(saved, tmp_path_factory):
    path, bundle = saved
    with pytest.raises(CheckpointError, match="not a checkpoint") as e:
        ckpt.load_(str(tmp_path_factory.mktemp("empty")), bundle)
    _one_line(e)
    meta_path = path / "meta.json"
    good = meta_path.read_text()
    tensors = path / json.loads(good)["tensors"]

    for text, match in [("{trunc", "unreadable"), ('{"format": "x"}', "not an rlhf-bench"),
                        (good.replace('"version": 1', '"version": 99'), "version 99"),
                        (good.replace('"step": 0', '"step": "zero"'), "malformed"),
                        (good.replace('"tensors": "', '"tensors": "../'), "malformed"),
                        (json.dumps({**json.loads(good), "state_step": -1}),
                         "state_step must be 0 or more"),
                        (json.dumps({**json.loads(good), "actor_opt_count": 2 ** 70}),
                         "actor_opt_count must be 0 or more and fit in 64 bits")]:
        meta_path.write_text(text)
        with pytest.raises(CheckpointError, match=match) as e:
            ckpt.load_(str(path), bundle)
        _one_line(e)
    meta_path.write_text(good)

    blob = tensors.read_bytes()
    tensors.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(CheckpointError, match="unreadable tensors") as e:
        ckpt.load_(str(path), bundle)
    _one_line(e)
    # a pickle where the tensors should be is rejected by the safetensors header, never run
    torch.save({"x": torch.zeros(2)}, tensors)
    with pytest.raises(CheckpointError, match="unreadable tensors"):
        ckpt.load_(str(path), bundle)


def test_checkpoint_of_other_models_is_refused_untouched(saved):
    path, _ = saved
    other = make_bundle("tiny-llama", seed=0)
    before = {k: p.clone() for k, p in other.actor.named_parameters()}
    with pytest.raises(CheckpointError, match="do not match the models") as e:
        ckpt.load_(str(path), other)
    _one_line(e)
    assert all(torch.equal(p, before[k]) for k, p in other.actor.named_parameters())
