"""The vllm engine computes what hf computes: greedy tokens before and after a train step and a
sync, its own log-probs within the parity tolerance, each state's weights; it keeps the run's
threads and sizes its KV pool from the work; what vLLM cannot run is unavailable in one line.

One engine for the whole module, started once per model (a start costs seconds): opt-mini,
opt-mini with LoRA, and a llama of head size 64 from a local folder (the tiny presets' head
size, 16, is not one vLLM's CPU attention takes)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engines
from bench import holdings
from bench.parity import max_gap, parity_tolerance, top_logit_scale
from core.engine import EngineUnavailable
from core.models import build_bundle
from core.step import ppo_step
from core.types import GenerationConfig
from engines.vllm import VLLMEngine, hf_weights, kv_pool_bytes   # imports no vLLM itself
from tests.conftest import make_bundle, make_cfg, make_prompts

if engines.missing("vllm", "cpu"):
    pytest.skip(f"vllm: {engines.missing('vllm', 'cpu')}", allow_module_level=True)

GREEDY = GenerationConfig(gen_len=8, greedy=True)
# lr 1e-3: one step moves the greedy answers (checked), so equal tokens after it mean the push
# reached vLLM
PPO = dict(actor_lr=1e-3, critic_lr=1e-3)
INIT_THREADS = []
BEFORE = {}   # what the process held before the module's engine (bench.holdings)


@pytest.fixture(scope="module")
def engine():
    """The module's one vLLM engine (eager: compiling would cost a minute per model)."""
    BEFORE.update(holdings.live_holdings())
    e = VLLMEngine(compile=False)
    yield e
    e.release()


@pytest.fixture(scope="module")
def opt(engine):
    """(bundle, cfg, engine state, hf, hf state) over opt-mini, one bundle for both engines.
    The engine starts at 2 threads (neither vLLM's 1 nor this suite's), kept in INIT_THREADS."""
    b = make_bundle("opt-mini", seed=0)
    cfg = make_cfg(preset="opt-mini", batch=4, prompt_len=12, gen=GREEDY, ppo=PPO)
    suite = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        state = engine.init(b, cfg, seed=0)
        INIT_THREADS.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(suite)
    hf = engines.get("hf")
    return b, cfg, state, hf, hf.init(b, cfg, seed=0)


def _llama_folder(path) -> str:
    """A llama (GQA: 2 query heads over 1 KV head of size 64) saved as a local model folder,
    its norm weights moved off 1."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p), alpha=0.1)
    model.save_pretrained(str(path))
    return str(path)


def _greedy_equal_hf_before_and_after_training(engine, b, cfg, state, hf, hs):
    prompts = make_prompts(b, cfg, seed=1)
    before = engine.generate(state, prompts, GREEDY, seed=0)
    assert torch.equal(before.seq, hf.generate(hs, prompts, GREEDY, seed=0).seq)
    state, _ = ppo_step(engine, state, prompts, cfg, seed=0)
    engine.sync(state)
    after = engine.generate(state, prompts, GREEDY, seed=0)
    assert not torch.equal(after.seq, before.seq), "the step did not move the greedy answers"
    assert torch.equal(after.seq, hf.generate(state, prompts, GREEDY, seed=0).seq)
    return state


def test_the_run_threads_are_kept(engine, opt):
    assert INIT_THREADS == [2]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)   # vLLM's no-op is gone: the process sets its threads
    try:
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)


def test_greedy_tokens_equal_hf_and_after_a_train_step_and_sync(engine, opt):
    b, cfg, state, hf, hs = opt
    state = _greedy_equal_hf_before_and_after_training(engine, b, cfg, state, hf, hs)
    assert engine.sync_bytes == sum(t.numel() * 4 for _, t in hf_weights(b.actor))


def test_answer_logprobs_within_the_parity_tolerance(engine, opt):
    b, cfg, _, hf, hs = opt
    state = hs   # the bundle's own tensors, as trained by the test before (or not)
    rollout = hf.generate(state, make_prompts(b, cfg, seed=2), GREEDY, seed=0)
    mine = engine.answer_logprobs(state, rollout)
    assert mine.shape == (cfg.batch, GREEDY.gen_len) and mine.dtype == torch.float32
    gap = max_gap(mine, hf.score(state, rollout).logprobs, rollout.answer_mask)
    assert gap <= parity_tolerance("float32", top_logit_scale(b.actor, rollout)), gap


def test_each_state_generates_with_its_own_weights(engine, opt):
    """Two states on one engine, no sync between: each generate is that state's, and hf's."""
    b, cfg, _, hf, hs = opt
    g = torch.Generator().manual_seed(7)
    other = hs._replace(actor_params={k: v.detach() + 0.2 * torch.randn(v.shape, generator=g)
                                      for k, v in hs.actor_params.items()})
    prompts = make_prompts(b, cfg, seed=3)
    ra = engine.generate(hs, prompts, GREEDY, seed=0)
    rb = engine.generate(other, prompts, GREEDY, seed=0)
    assert not torch.equal(ra.seq, rb.seq), "the two states' weights gave one rollout"
    assert torch.equal(rb.seq, hf.generate(other, prompts, GREEDY, seed=0).seq)
    assert torch.equal(engine.generate(hs, prompts, GREEDY, seed=0).seq, ra.seq)


def test_sampling_is_seeded_per_row_and_stops_at_eos_like_hf(engine, opt, monkeypatch):
    b, cfg, _, hf, hs = opt
    prompts = make_prompts(b, cfg, seed=4)
    gen = GenerationConfig(gen_len=8, temperature=1.0)
    r1, r2 = (engine.generate(hs, prompts, gen, seed=5) for _ in range(2))
    assert torch.equal(r1.seq, r2.seq)
    assert not torch.equal(r1.seq, engine.generate(hs, prompts, gen, seed=6).seq)
    # an "EOS" that greedy decoding emits mid-answer: both stop there and pad the rest
    greedy = engine.generate(hs, prompts, GREEDY, seed=0)
    eos = int(greedy.seq[0, cfg.prompt_len + 2])
    stop = GenerationConfig(gen_len=8, greedy=True, stop_at_eos=True)
    monkeypatch.setattr(engine, "models", engine.models._replace(eos_id=eos))
    monkeypatch.setattr(hf, "models", hf.models._replace(eos_id=eos))
    got, want = engine.generate(hs, prompts, stop, seed=0), hf.generate(hs, prompts, stop, seed=0)
    assert torch.equal(got.seq, want.seq) and torch.equal(got.answer_mask, want.answer_mask)
    assert not got.answer_mask[0, 3:].any()


def test_the_kv_pool_is_the_run_batch_and_lengths(engine, opt):
    b, cfg, *_ = opt
    blocks = engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    length = cfg.prompt_len + cfg.gen.gen_len       # 20 tokens: one block of 128 per row
    assert blocks == cfg.batch + 1                   # and vLLM's null block
    # 2 x 4 layers x 4 heads x 64 x 4 bytes per token
    assert engine.kv_pool_bytes == kv_pool_bytes(b.config, cfg.batch, length, 4, 128) \
        == (cfg.batch + 1) * 128 * 2 * 4 * 4 * 64 * 4
    assert f"KV pool {engine.kv_pool_bytes / 2**20:.1f} MiB" in engine.note


def test_the_weight_copies_it_declares_are_the_ones_it_holds(engine, opt):
    """As tests/engine_checks.py checks every engine that runs the tiny presets (vLLM's CPU
    attention does not take their head size). On the CPU: the trained copy, vLLM's loaded
    weights, and its oneDNN-packed copy of every matmul weight (the tied head included)."""
    b, cfg, state, hf, hs = opt
    measured = holdings.weight_copies(engine, b, (state, hs), exclude=BEFORE)
    assert abs(measured - engine.weight_copies) <= 0.25, measured


def test_lora_is_merged_for_the_push_and_the_module_left_alone():
    b = build_bundle("opt-mini", seed=0, lora_dim=4, actor_only=True)
    with torch.no_grad():
        for n, p in b.actor.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    before = {n: p.clone() for n, p in b.actor.named_parameters()}
    pushed = dict(hf_weights(b.actor))
    assert all(torch.equal(before[n], p) for n, p in b.actor.named_parameters())
    merged = b.actor.merge_and_unload()       # PEFT's own merge, as the reference
    want = dict(merged.named_parameters())
    assert pushed.keys() == want.keys()
    for n, t in want.items():
        torch.testing.assert_close(pushed[n], t, atol=1e-6, rtol=0, msg=n)


def test_a_model_vllm_cannot_run_is_unavailable_in_one_line(monkeypatch):
    e = VLLMEngine()
    with pytest.raises(EngineUnavailable, match="head sizes .*; this model's is 16$") as err:
        e.init(make_bundle("tiny-opt"), make_cfg(), seed=0)
    assert "\n" not in str(err.value) and e.llm is None
    with pytest.raises(EngineUnavailable, match="DeepSpeed ZeRO cannot share a process with vLLM"):
        e.init(make_bundle("opt-mini", actor_only=True), make_cfg(zero_stage=0), seed=0)
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)   # import vllm fails
    with pytest.raises(EngineUnavailable, match="vllm cannot be imported: ModuleNotFoundError"):
        e.init(make_bundle("tiny-opt"), make_cfg(), seed=0)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "vllm" else real(n, *a))
    assert engines.missing("vllm", "cpu") == "needs the vllm package (not installed)"
    assert "vllm" not in engines.available("cpu")


def test_a_lora_actor_equals_hf_after_a_step_with_no_sync(engine, opt):
    """The merged weights reach vLLM, and a generate after a train step with no sync between
    pushes first (the weights' versions moved). Moves the module's engine to another model."""
    b = build_bundle("opt-mini", seed=0, lora_dim=4)
    with torch.no_grad():   # PEFT starts lora_B at 0, which would hide a missing merge
        for n, p in b.actor.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    cfg = make_cfg(preset="opt-mini", lora_dim=4, batch=4, prompt_len=12, gen=GREEDY,
                   ppo=dict(PPO, actor_lr=1e-2))
    state = engine.init(b, cfg, seed=0)
    assert "LoRA merged" in engine.note
    hf = engines.get("hf")
    hs = hf.init(b, cfg, seed=0)
    prompts = make_prompts(b, cfg, seed=1)
    before = engine.generate(state, prompts, GREEDY, seed=0)
    assert torch.equal(before.seq, hf.generate(hs, prompts, GREEDY, seed=0).seq)
    state, _ = ppo_step(engine, state, prompts, cfg, seed=0)
    after = engine.generate(state, prompts, GREEDY, seed=0)
    assert not torch.equal(after.seq, before.seq), "the step did not move the greedy answers"
    assert torch.equal(after.seq, hf.generate(state, prompts, GREEDY, seed=0).seq)


def test_a_llama_family_model_equals_hf_and_after_training(engine, opt, tmp_path):
    """Last: it moves the module's engine to another model."""
    b = build_bundle(_llama_folder(tmp_path / "llama"), seed=0)
    cfg = make_cfg(preset=str(tmp_path / "llama"), batch=4, prompt_len=12, gen=GREEDY, ppo=PPO)
    state = engine.init(b, cfg, seed=0)
    hf = engines.get("hf")
    _greedy_equal_hf_before_and_after_training(engine, b, cfg, state, hf, hf.init(b, cfg, seed=0))



def test_deepspeed_still_starts_after_vllm_shut_down_the_group_it_joined():
    """vLLM joins the process group DeepSpeed made and destroys it at shutdown; DeepSpeed's
    next start in the process must not use its clone of that group. In a process of its own:
    this module's engine holds a group for the module's whole life."""
    script = """if True:
        import engines
        from tests.conftest import make_bundle, make_cfg, make_prompts
        from engines.vllm import VLLMEngine
        cfg = make_cfg(zero_stage=0)
        engines.get("hf").init(make_bundle("tiny-opt", seed=0), cfg, seed=0)
        v = VLLMEngine(compile=False)
        v.init(make_bundle("opt-mini", seed=0), make_cfg(preset="opt-mini"), seed=0)
        v.release()
        hf = engines.get("hf")
        b = make_bundle("tiny-opt", seed=0)
        state = hf.init(b, cfg, seed=0)
        r = hf.generate(state, make_prompts(b, cfg, seed=1), cfg.gen, seed=0)
        print("generated", tuple(r.seq.shape))
    """
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "generated (4, 14)" in p.stdout


def test_the_worker_imports_vllm_before_its_memory_baseline():
    """vLLM's ~340 MB of library code is loaded by the engine's preload, which the worker calls
    before the baseline its peaks count from."""
    code = ("import sys\n"
            "from bench.options import BenchOptions\n"
            "from bench.worker import _import_libraries\n"
            "from engines.vllm import VLLMEngine\n"
            "assert 'vllm' not in sys.modules\n"
            "_import_libraries(BenchOptions(preset='opt-mini'), 'vllm', VLLMEngine())\n"
            "print('vllm' in sys.modules)\n")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-1] == "True"
