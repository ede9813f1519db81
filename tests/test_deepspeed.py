"""DeepSpeed engines and multi-rank runs, on CPU.

Budget: DeepSpeed's first init on a fresh machine JIT-builds its shared-memory comm op (~1-2 min)
and ZeRO-Offload its CPU Adam (~100 s); both are cached in TORCH_EXTENSIONS_DIR (the Makefile
keeps it in .cache/). Every in-process DeepSpeed run shares one single-rank process group on a
free port; every launched run gets a free port of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
pytest.importorskip("deepspeed")

import engines  # noqa: E402
from bench import distributed  # noqa: E402
from bench.options import BenchOptions, ConfigError  # noqa: E402
from conftest import make_bundle, make_cfg, make_prompts  # noqa: E402
from core.engine import EngineUnavailable  # noqa: E402
from core.step import ppo_step  # noqa: E402
from core.types import GenerationConfig  # noqa: E402
from engines.hf import hf_generate  # noqa: E402
from engines.zero import free_port  # noqa: E402

# lr large enough that 3 steps move the weights well past fp32 noise (parity is not vacuous);
# grad_accum 2 checks DeepSpeed's accumulation against the torch backend's mean gradient.
TRAIN = dict(actor_lr=1e-3, critic_lr=1e-3, grad_accum=2)
PROBE = GenerationConfig(gen_len=8, greedy=True)
SAMPLED = GenerationConfig(gen_len=8)
TOL = 1e-5  # losses, grad norms, weights after 3 steps; measured: <= 1.2e-7 (2e-7 relative)


def _gathered(module) -> dict:
    """name -> full copy of each parameter (gathered first under ZeRO-3)."""
    from deepspeed.runtime.zero import GatheredParameters
    params = list(module.parameters())
    with GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def _train(stage: int, steps: int = 3, **kw):
    b = make_bundle()
    cfg = make_cfg(zero_stage=stage, ppo=TRAIN, **kw)
    e = engines.get("hf")
    s = e.init(b, cfg, seed=0)
    metrics = []
    for i in range(steps):
        s, m = ppo_step(e, s, make_prompts(b, cfg, i), cfg, seed=i)
        metrics.append(m)
    return metrics, _gathered(b.actor), _gathered(b.critic)


@pytest.fixture(scope="module")
def torch_run():
    return _train(-1)


def _assert_same_training(run, ref):
    (ms, actor, critic), (ref_ms, ref_actor, ref_critic) = run, ref
    for m, r in zip(ms, ref_ms):
        for k in ("actor_loss", "critic_loss", "grad_norm_actor", "grad_norm_critic"):
            assert abs(float(getattr(m, k)) - float(getattr(r, k))) <= TOL * max(
                1.0, abs(float(getattr(r, k)))), k
    moved = max((ref_actor[k] - v).abs().max().item() for k, v in _gathered_init().items())
    assert moved > 100 * TOL  # training changed the weights: the comparison below means something
    for got, want in ((actor, ref_actor), (critic, ref_critic)):
        assert got.keys() == want.keys()
        for k in want:
            # A key bias has an exactly zero gradient (softmax ignores a constant shift), so
            # Adam turns rounding noise into steps of up to ~lr: held to the step size only.
            tol = TRAIN["actor_lr"] if k.endswith("k_proj.bias") else TOL
            torch.testing.assert_close(got[k], want[k], atol=tol, rtol=0, msg=k)


_INIT = {}


def _gathered_init() -> dict:
    if not _INIT:
        _INIT.update({n: p.detach().clone() for n, p in make_bundle().actor.named_parameters()})
    return _INIT


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_training_matches_torch_backend(stage, torch_run):
    _assert_same_training(_train(stage), torch_run)


@pytest.mark.parametrize("stage", [0, 2])
def test_zero_nan_loss_stops_before_the_actor_moves(stage):
    from core.guards import NonFiniteError
    from core.step import add_advantages
    b = make_bundle()
    cfg = make_cfg(zero_stage=stage, ppo=TRAIN)
    e = engines.get("hf")
    s = e.init(b, cfg, seed=0)
    exp = add_advantages(e.score(s, e.generate(s, make_prompts(b, cfg, 0), cfg.gen, seed=0)),
                         cfg.ppo)
    adv = exp.advantages.clone()
    adv[-1, 1] = float("nan")  # in the second micro-batch: the first has had its backward
    before = _gathered(b.actor)
    with pytest.raises(NonFiniteError) as err:
        e.train_step(s, exp._replace(advantages=adv), cfg.ppo, seed=0)
    assert (err.value.phase, err.value.name) == ("train", "actor_loss")
    after = _gathered(b.actor)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_zero_grad_checkpointing_matches_torch_backend(torch_run):
    _assert_same_training(_train(2, grad_ckpt=True), torch_run)


def test_zero3_gathered_holds_full_weights_and_generates_like_hf():
    from engines import zero
    b, ref = make_bundle(), make_bundle()
    cfg = make_cfg(zero_stage=3)
    engine = zero.initialize(b.actor, 1e-3, cfg)
    prompts = make_prompts(b, cfg, 3)
    want = hf_generate(ref.actor, prompts, PROBE, seed=0, pad_id=b.pad_id, eos_id=b.eos_id).seq
    def layer_hooks(module):
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks)
                   for m in list(module.modules())[1:])

    with zero.gathered(engine) as module:
        assert layer_hooks(module) == 0  # ZeRO's hooks are off: nothing is gathered per layer
        for n, p in ref.actor.named_parameters():
            assert torch.equal(dict(module.named_parameters())[n], p)
        got = hf_generate(module, prompts, PROBE, seed=0, pad_id=b.pad_id, eos_id=b.eos_id).seq
    assert torch.equal(got, want)
    assert layer_hooks(engine.module) > 0  # and back on afterwards
    assert all(p.numel() == 0 or p.ds_persist for p in engine.module.parameters())  # released


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_generation_only_builds_no_optimiser_where_deepspeed_allows(stage):
    """train=False (--phases generate), on the actor-only bundle such a run builds: ZeRO-0 and
    3 engines get no optimiser, and ZeRO-3 still partitions the parameters, so hybrid's
    gather-once generates what hf does; ZeRO-1 and 2 partition optimiser state, so DeepSpeed
    requires one and the actor keeps it (there is no critic)."""
    from core.types import Experience
    b, ref = make_bundle(actor_only=True), make_bundle()
    cfg = make_cfg(zero_stage=stage).replace(train=False)
    e = engines.get("hybrid")
    state = e.init(b, cfg, seed=0)
    assert e.opts[1] is None and state.critic_params == {}
    if stage == 2:
        assert state.actor_opt is not None and state.critic_opt is None
        return
    assert state.actor_opt is None and state.critic_opt is None
    with pytest.raises(ValueError, match="no optimiser state"):
        e.train_step(state, Experience(*(None,) * len(Experience._fields)), cfg.ppo, seed=0)
    if stage == 3:
        assert all(p.numel() == 0 or p.ds_persist for p in b.actor.parameters())  # partitioned
    prompts = make_prompts(b, cfg, 3)
    want = hf_generate(ref.actor, prompts, PROBE, seed=0, pad_id=b.pad_id, eos_id=b.eos_id).seq
    assert torch.equal(e.generate(state, prompts, PROBE, seed=0).seq, want)


@pytest.mark.slow  # JIT-builds DeepSpeed's CPU Adam (~100 s) on a fresh machine
def test_zero_offload_cpu_adam_matches_torch_backend(torch_run):
    _assert_same_training(_train(2, offload=True), torch_run)


# ---- ds-inference: a second copy, synced by streaming (name, tensor) ----

BIG_LR = dict(actor_lr=1e-2, critic_lr=1e-2)  # one step changes the greedy tokens


def _before_after(name: str, stage: int):
    """Greedy tokens before and after one PPO step, and sampled tokens after it."""
    b = make_bundle()
    cfg = make_cfg(zero_stage=stage, ppo=BIG_LR)
    e = engines.get(name)
    s = e.init(b, cfg, seed=0)
    probe = make_prompts(b, cfg, 99)
    before = e.generate(s, probe, PROBE, seed=1).seq
    s, _ = ppo_step(e, s, make_prompts(b, cfg, 0), cfg, seed=0)
    e.sync(s)  # what the next ppo_step would do first
    return e, before, e.generate(s, probe, PROBE, seed=1).seq, e.generate(s, probe, SAMPLED,
                                                                          seed=2).seq


@pytest.fixture(scope="module")
def hf_tokens():
    _, before, after, sampled = _before_after("hf", -1)
    assert not torch.equal(before, after)  # training changed the output: the tests can tell
    return before, after, sampled


@pytest.mark.parametrize("stage", [-1, 3])
def test_ds_inference_generates_what_hf_does_before_and_after_training(stage, hf_tokens):
    e, before, after, sampled = _before_after("ds-inference", stage)
    assert torch.equal(before, hf_tokens[0])
    assert torch.equal(after, hf_tokens[1])
    assert torch.equal(sampled, hf_tokens[2])
    assert e.weight_copies == 2
    n_bytes = sum(p.numel() * p.element_size() for p in make_bundle().actor.parameters())
    assert e.sync_bytes == n_bytes  # every trainable tensor, once (the tied head is the embedding)


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama", "tiny-gpt2"])
def test_kernel_blocker_names_cache_based_layers(preset):
    """transformers 5 decoder layers take a Cache: DeepSpeed's injected layers (legacy tuple
    contract) cannot replace them, so ds-inference runs without injection and says so, and
    ds-hybrid is unavailable. A legacy-contract layer is not blocked."""
    from engines.ds_inference import kernel_blocker
    actor = make_bundle(preset).actor
    layer = next(m for m in actor.modules() if isinstance(m, torch.nn.ModuleList))[0]
    why = kernel_blocker(actor)
    assert why is not None and why.startswith(f"{type(layer).__name__}.forward takes a Cache")

    class Legacy(torch.nn.Module):
        def forward(self, hidden_states, layer_past=None, attention_mask=None, use_cache=False):
            return hidden_states, None
    assert kernel_blocker(torch.nn.Sequential(torch.nn.ModuleList([Legacy()]))) is None


def test_ds_inference_says_why_it_runs_without_kernels():
    e = engines.get("ds-inference")
    e.init(make_bundle(), make_cfg(), seed=0)
    assert not e.inject and e.note.startswith("no kernel injection: ") and "CUDA" in e.note


def test_ds_inference_without_sync_goes_stale(monkeypatch, hf_tokens):
    from engines.ds_inference import DSInferenceEngine
    monkeypatch.setattr(DSInferenceEngine, "sync", lambda self, state: None)
    _, before, after, _ = _before_after("ds-inference", -1)
    assert torch.equal(before, hf_tokens[0])
    assert not torch.equal(after, hf_tokens[1])  # the inference copy kept the old weights


# ---- ds-hybrid: DeepSpeed's Hybrid Engine needs CUDA ----

def test_ds_hybrid_is_unavailable_on_cpu():
    with pytest.raises(EngineUnavailable, match="CUDA"):
        engines.get("ds-hybrid").init(make_bundle(), make_cfg(zero_stage=0), seed=0)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_ds_hybrid_row_says_unavailable_through_the_cli(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "bench", "run", "--engines", "hf,ds-hybrid",
                        "--batch", "2", "--prompt-len", "8", "--gen-len", "4", "--steps", "1",
                        "--warmup", "0", "--out", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    # exit 2: an engine asked for by name could not run here; the row says why, hf still ran
    assert p.returncode == 2, p.stderr[-2000:]
    assert "unavailable on this machine: ds-hybrid" in p.stderr
    status = json.loads((out / "results.json").read_text())["engines"]
    assert status["hf"]["status"] == "ok"
    assert status["ds-hybrid"]["status"].startswith("unavailable: DeepSpeed's Hybrid Engine")
    assert "unavailable" in p.stdout


# ---- multi-rank ----

def test_multi_rank_options_are_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="does not split over 2 ranks"):
        distributed.check(BenchOptions(batch=3, zero_stage=2))
    with pytest.raises(ConfigError, match="--zero-stage"):
        distributed.check(BenchOptions(batch=4))
    with pytest.raises(ConfigError, match="--inference-tp 4"):
        distributed.check(BenchOptions(batch=4, zero_stage=2, inference_tp=4))
    distributed.check(BenchOptions(batch=4, zero_stage=2, inference_tp=2))


def test_torchrun_two_ranks_zero3_writes_both_ranks_timings(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "bench", "run",
           "--engines", "hf,ds-inference", "--inference-tp", "2", "--zero-stage", "3",
           "--batch", "4", "--prompt-len", "8", "--gen-len", "4", "--steps", "1",
           "--warmup", "0", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    data = json.loads((out / "results.json").read_text())
    assert data["env"]["world_size"] == 2
    assert {k: v["status"] for k, v in data["engines"].items()} == {"hf": "ok",
                                                                   "ds-inference": "ok"}
    for engine in ("hf", "ds-inference"):
        rows = {(r["phase"], r["metric"]): r["value"] for r in data["rows"]
                if r["engine"] == engine and r["step"] == 0}
        for phase in ("generate", "score", "train", "step"):
            per_rank = [rows[(phase, f"seconds_rank{k}")] for k in (0, 1)]
            assert rows[(phase, "seconds")] == max(per_rank)  # the slowest rank's time
    assert (out / "rank1" / "results.json").exists()  # rank 1 kept its own view apart
    assert p.stdout.count("results:") == 1  # one summary, from rank 0
