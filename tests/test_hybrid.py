"""The hybrid engine computes what hf computes: tokens, logits, training, LoRA, cache life."""
from __future__ import annotations

import pytest
import torch

import engines
from core.engine import EngineUnavailable
from core.models import _vary_constants_, position_ids, weight_bytes
from core.types import GenerationConfig, PPOConfig
from engines import decoder as D
from engines import kernels as K
from engines import lora_fold as LF

from conftest import lockstep, make_bundle, make_cfg, make_prompts, params_of

FAMILIES = ["tiny-opt", "tiny-llama", "tiny-qwen2", "tiny-gpt2"]
HYBRIDS = ["hybrid", "hybrid-packed"]
# (lora rank, engine, hybrid's LoRA mode): with adapters, hybrid both folds them into the weights
# for generation and runs them unfused; packed decode always runs them unfused
VARIANTS = [(0, "hybrid", "auto"), (0, "hybrid-packed", "auto"), (4, "hybrid", "fused"),
            (4, "hybrid", "unfused"), (4, "hybrid-packed", "auto")]


def _nudge_lora(bundle):
    # PEFT starts lora_B at zero, which would hide a wrong LoRA path: give it real values
    with torch.no_grad():
        for n, p in bundle.actor.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(n)))


def _pair(preset, engine, lora=0, mode="auto", **cfg_kw):
    b = make_bundle(preset, seed=0, lora_dim=lora)
    if lora:
        _nudge_lora(b)
    cfg = make_cfg(preset=preset, lora_dim=lora, **cfg_kw)
    hf, hy = engines.get("hf"), engines.get(engine, lora_mode=mode)
    return b, cfg, hf, hf.init(b, cfg, seed=0), hy, hy.init(b, cfg, seed=0)


@pytest.mark.parametrize("lora,engine,mode", VARIANTS)
@pytest.mark.parametrize("preset", FAMILIES)
def test_tokens_equal_hf_greedy_and_sampled(preset, lora, engine, mode):
    b, cfg, hf, s1, hy, s2 = _pair(preset, engine, lora, mode)
    prompts = make_prompts(b, cfg, seed=3)
    for greedy in (True, False):
        gen = GenerationConfig(gen_len=64, greedy=greedy)
        r1 = hf.generate(s1, prompts, gen, seed=11)
        r2 = hy.generate(s2, prompts, gen, seed=11)
        assert torch.equal(r1.seq, r2.seq), f"{preset} lora={lora} greedy={greedy}"
        assert torch.equal(r1.attention_mask, r2.attention_mask)
    other = hy.generate(s2, prompts, GenerationConfig(gen_len=64), seed=12)
    assert not torch.equal(other.seq, r2.seq)  # the seed really drives sampling


@pytest.mark.parametrize("lora,engine,mode", VARIANTS)
@pytest.mark.parametrize("preset", FAMILIES)
def test_generation_path_logprobs_equal_the_training_forwards(preset, lora, engine, mode):
    """answer_logprobs (prefill + cached decode, teacher-forced: the numbers generation
    samples from) equal the log-probs scoring computes with one full forward."""
    b, cfg, hf, s1, hy, s2 = _pair(preset, engine, lora, mode)
    rollout = hf.generate(s1, make_prompts(b, cfg, seed=6), GenerationConfig(gen_len=48),
                          seed=2)
    got, want = hy.answer_logprobs(s2, rollout), hf.score(s1, rollout).logprobs
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("preset", FAMILIES + ["opt-mini"])
def test_bf16_generation_path_logprobs_are_within_the_bf16_parity_tolerance(preset):
    """In bf16 every linear goes through oneDNN (decode rows and prefill alike) and attention
    through SDPA: the log-probs generation samples from stay within the harness's bf16
    tolerance of the training forward's, over prompts of 24 rows x 40 tokens (prefill and
    decode both above the fp32 kernel's 16 rows)."""
    from bench.parity import max_gap, parity_tolerance, top_logit_scale
    b = make_bundle(preset, seed=0, dtype=torch.bfloat16)
    cfg = make_cfg(preset=preset, batch=24, prompt_len=40, dtype="bfloat16")
    hf, hy = engines.get("hf"), engines.get("hybrid")
    s1, s2 = hf.init(b, cfg, seed=0), hy.init(b, cfg, seed=0)
    rollout = hf.generate(s1, make_prompts(b, cfg, seed=6), GenerationConfig(gen_len=16),
                          seed=2)
    got, want = hy.answer_logprobs(s2, rollout), hf.score(s1, rollout).logprobs
    tol = parity_tolerance("bfloat16", top_logit_scale(b.actor, rollout))
    gap = max_gap(got, want, rollout.answer_mask)
    assert got.shape == want.shape and 0 < gap <= tol, (gap, tol)


@pytest.mark.parametrize("preset", FAMILIES)
def test_stop_at_eos_equals_hf(preset):
    b = make_bundle(preset, seed=0)
    cfg = make_cfg(preset=preset)
    prompts = make_prompts(b, cfg, seed=4)
    # call the answers' most frequent token "EOS", so rows stop at different points
    hf = engines.get("hf")
    s = hf.init(b, cfg, seed=0)
    sampled = hf.generate(s, prompts, GenerationConfig(gen_len=48), seed=5).seq[:, cfg.prompt_len:]
    b = b._replace(eos_id=int(sampled.flatten().mode().values))
    hf, hy = engines.get("hf"), engines.get("hybrid")
    s1, s2 = hf.init(b, cfg, seed=0), hy.init(b, cfg, seed=0)
    gen = GenerationConfig(gen_len=48, stop_at_eos=True)
    r1, r2 = hf.generate(s1, prompts, gen, seed=5), hy.generate(s2, prompts, gen, seed=5)
    assert torch.equal(r1.seq, r2.seq) and torch.equal(r1.answer_mask, r2.answer_mask)
    lengths = r1.answer_mask.sum(-1)
    assert lengths.min() < 48 and (r1.seq[:, cfg.prompt_len:][~r1.answer_mask] == b.pad_id).all()


@pytest.mark.parametrize("preset", FAMILIES)
def test_fixed_length_answers_run_past_the_models_own_eos(preset):
    """Without stop_at_eos every row runs its full length, even when it samples the EOS that
    the model's own generation config names (HF generate fills an unset eos from there)."""
    b, cfg, hf, s1, hy, s2 = _pair(preset, "hybrid")
    prompts = make_prompts(b, cfg, seed=4)
    gen = GenerationConfig(gen_len=48)
    sampled = hf.generate(s1, prompts, gen, seed=5).seq[:, cfg.prompt_len:]
    b.actor.generation_config.eos_token_id = int(sampled[:, :40].flatten().mode().values)
    r1, r2 = hf.generate(s1, prompts, gen, seed=5), hy.generate(s2, prompts, gen, seed=5)
    assert torch.equal(r1.seq[:, cfg.prompt_len:], sampled) and bool(r1.answer_mask.all())
    assert torch.equal(r1.seq, r2.seq)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("preset", FAMILIES)
def test_cached_decode_logits_equal_full_forward(preset, lora, packed):
    """Teacher forcing: logits from prefill + one-token cached decode steps equal the logits
    of one full forward of the whole sequence (left padding included)."""
    b = make_bundle(preset, seed=0, lora_dim=lora)
    if lora:
        _nudge_lora(b)
    cfg = make_cfg(preset=preset)
    prompts = make_prompts(b, cfg, seed=6)
    B, P, G = cfg.batch, cfg.prompt_len, 24
    answer = torch.randint(3, b.config.vocab_size, (B, G),
                           generator=torch.Generator().manual_seed(1))
    seq = torch.cat([prompts.input_ids, answer], 1)
    am = torch.cat([prompts.attention_mask, torch.ones_like(answer)], 1)
    with torch.no_grad():
        full = b.actor(input_ids=seq, attention_mask=am, position_ids=position_ids(am)).logits
        w = D.extract(b.actor)
        if packed:
            w, nbytes = D.pack(w, B)
            assert nbytes > 0
        cache = D.new_cache(w, B, P + G, torch.float32, "cpu")
        km = am.bool()
        pos = position_ids(am)
        got = [D.forward_(w, cache, prompts.input_ids, pos[:, :P], 0, km)]
        for t in range(G - 1):
            got.append(D.forward_(w, cache, answer[:, t:t + 1], pos[:, P + t:P + t + 1], P + t, km))
    got = torch.stack(got, 1)                 # (B, G, V)
    want = full[:, P - 1:-1]
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("lora,engine,mode", VARIANTS)
@pytest.mark.parametrize("preset", FAMILIES)
def test_three_ppo_steps_equal_hf(preset, lora, engine, mode):
    """Same prompts, seeds and weights: after 3 PPO steps the trained parameters agree, and each
    generate after a train step saw the new weights (no copy, no re-capture)."""
    ppo = PPOConfig(actor_lr=3e-4, critic_lr=3e-4, eps=1e-6)
    b1, b2 = make_bundle(preset, 0, lora_dim=lora), make_bundle(preset, 0, lora_dim=lora)
    if lora:
        _nudge_lora(b1), _nudge_lora(b2)
    cfg = make_cfg(preset=preset, lora_dim=lora, ppo=ppo, gen={"gen_len": 12})
    hf, hy = engines.get("hf"), engines.get(engine, lora_mode=mode)
    lockstep(hf, hf.init(b1, cfg, seed=0), hy, hy.init(b2, cfg, seed=0), b1, cfg, 3, preset)
    moved = 0.0
    for (n, p1), (_, p2), p0 in zip(b1.actor.named_parameters(), b2.actor.named_parameters(),
                                    make_bundle(preset, 0, lora_dim=lora).actor.parameters()):
        assert (p1 - p2).abs().max() < 1e-5, n
        moved = max(moved, float((p1 - p0).abs().max()))
    assert moved > 1e-4  # training really changed the weights


def test_release_frees_cache_and_next_generate_reallocates():
    b, cfg, hf, s1, hy, s2 = _pair("tiny-opt", "hybrid")
    prompts = make_prompts(b, cfg, seed=0)
    gen = GenerationConfig(gen_len=8, greedy=True)
    first = hy.generate(s2, prompts, gen, seed=0)
    cache = hy.cache
    assert cache is not None and cache.k[0].shape[2] == cfg.prompt_len + 8
    hy.generate(s2, prompts, gen, seed=0)
    assert hy.cache is cache  # reused across steps, not reallocated
    hy.release()
    assert hy.cache is None
    again = hy.generate(s2, prompts, gen, seed=0)
    assert hy.cache is not None and hy.cache is not cache
    assert torch.equal(first.seq, again.seq)


def test_static_decode_reuses_a_longer_cache():
    """A shorter generate after a longer one reuses the longer cache; the fixed-shape decode
    masks the slots past its end and still samples hf's tokens."""
    b, cfg, hf, s1, _, _ = _pair("tiny-opt", "hybrid")
    st = engines.get("hybrid", static=True)
    s3 = st.init(b, cfg, seed=0)
    prompts = make_prompts(b, cfg, seed=1)
    st.generate(s3, prompts, GenerationConfig(gen_len=24), seed=0)
    cache = st.cache
    gen = GenerationConfig(gen_len=8)
    assert torch.equal(st.generate(s3, prompts, gen, seed=3).seq,
                       hf.generate(s1, prompts, gen, seed=3).seq)
    assert st.cache is cache and cache.k[0].shape[2] == cfg.prompt_len + 24


def test_one_copy_generation_reads_live_parameters():
    b, cfg, hf, s1, hy, s2 = _pair("tiny-opt", "hybrid")
    w = D.extract(b.actor)
    params = {p.data_ptr() for p in b.actor.parameters()}
    assert w.head.w.data_ptr() in params and w.layers[0].up.w.data_ptr() in params
    assert hy.weight_copies == 1
    packed = engines.get("hybrid-packed")
    packed.init(b, make_cfg(), seed=0)
    # a re-laid-out copy counts, at the size MKL allocates for it (more than the weights')
    assert packed.weight_copies == 1 + packed.packed_bytes / weight_bytes(b.actor) > 2


def test_unsupported_model_is_a_clear_error():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64)
    model = GPTNeoXForCausalLM(cfg)
    with pytest.raises(D.UnsupportedModel, match="gpt_neox"):
        D.extract(model)
    b = make_bundle("tiny-opt", 0)
    b = b._replace(actor=model)
    with pytest.raises(EngineUnavailable, match="no decoder for model type 'gpt_neox'"):
        engines.get("hybrid").init(b, make_cfg(), seed=0)


def _saved_model(cfg, tmp_path) -> str:
    """A local model folder built from `cfg`, its biases and norm scales off HF's 0 and 1 as
    the presets' are (so that a dropped one shows)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    _vary_constants_(AutoModelForCausalLM.from_config(cfg)).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("preset,rope", [
    ("tiny-llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    ("tiny-llama", {"rope_type": "linear", "factor": 2.0}),
    ("tiny-qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})])
def test_scaled_rope_generates_as_hf(preset, rope, tmp_path):
    """Llama 3's, linear and YaRN RoPE scaling (a local model's config) change the frequencies,
    and YaRN the attention scale too: hybrid's tokens and log-probs still equal hf's."""
    from transformers import AutoModelForCausalLM

    from core.models import build_config
    cfg = build_config(preset)
    plain = AutoModelForCausalLM.from_config(cfg).model.rotary_emb
    cfg.rope_parameters = {**cfg.rope_parameters, **rope}
    b, run, hf, s1, hy, s2 = _pair(_saved_model(cfg, tmp_path), "hybrid")
    rot = b.actor.model.rotary_emb
    assert not torch.allclose(rot.inv_freq, plain.inv_freq)  # the scaling is really there
    prompts = make_prompts(b, run, seed=3)
    gen = GenerationConfig(gen_len=40, greedy=True)
    r1, r2 = hf.generate(s1, prompts, gen, seed=1), hy.generate(s2, prompts, gen, seed=1)
    assert torch.equal(r1.seq, r2.seq)
    assert (hy.answer_logprobs(s2, r1) - hf.score(s1, r1).logprobs).abs().max() < 1e-4


def test_rope_recomputed_per_length_is_refused():
    from transformers import AutoModelForCausalLM

    from core.models import build_config
    cfg = build_config("tiny-llama")
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(D.UnsupportedModel, match="rope type 'dynamic' is not supported"):
        D.extract(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_sliding_window_models_equal_hf_up_to_the_window(kind, tmp_path):
    """Up to its window a sliding-window model is full attention, and hybrid equals hf there.
    Beyond it hf masks keys this decoder would read: hybrid refuses, at init and in generate."""
    from transformers import CONFIG_MAPPING
    kw = dict(vocab_size=512, max_position_embeddings=256, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
              sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2":  # the window on the layers from max_window_layers on
        kw.update(use_sliding_window=True, max_window_layers=1)
    path = _saved_model(CONFIG_MAPPING[kind](**kw), tmp_path)
    b, run, hf, s1, hy, s2 = _pair(path, "hybrid", prompt_len=8, gen={"gen_len": 8})  # the window
    prompts = make_prompts(b, run, seed=3)
    for greedy in (True, False):
        gen = GenerationConfig(gen_len=8, greedy=greedy)
        assert torch.equal(hf.generate(s1, prompts, gen, seed=1).seq,
                           hy.generate(s2, prompts, gen, seed=1).seq)
    with pytest.raises(D.UnsupportedModel, match="window is 16 tokens and these sequences are 17"):
        hy.generate(s2, prompts, GenerationConfig(gen_len=9), seed=1)
    longer = make_cfg(preset=path, prompt_len=8, gen={"gen_len": 9})
    with pytest.raises(EngineUnavailable, match="sliding window is 16 tokens"):
        engines.get("hybrid").init(b, longer, seed=0)


@pytest.mark.parametrize("preset", FAMILIES)
def test_static_decode_equals_dynamic_decode(preset):
    """The fixed-shape decode (what CUDA graphs replay) samples exactly what the default does."""
    b, cfg, hf, s1, hy, s2 = _pair(preset, "hybrid")
    st = engines.get("hybrid", static=True)
    s3 = st.init(b, cfg, seed=0)
    prompts = make_prompts(b, cfg, seed=2)
    for greedy in (True, False):
        gen = GenerationConfig(gen_len=32, greedy=greedy)
        assert torch.equal(hy.generate(s2, prompts, gen, seed=9).seq,
                           st.generate(s3, prompts, gen, seed=9).seq)


def test_static_decode_compiles_as_one_graph():
    """fullgraph=True: no graph break, which CUDA-graph capture on GPU relies on. Compiled on
    CPU here (inductor), and it must sample the same tokens as eager."""
    b, cfg, hf, s1, hy, s2 = _pair("tiny-opt", "hybrid")
    st = engines.get("hybrid", static=True)
    s3 = st.init(b, cfg, seed=0)
    st._decode = torch.compile(D.decode_static_, fullgraph=True, dynamic=False)
    prompts = make_prompts(b, cfg, seed=2)
    gen = GenerationConfig(gen_len=16)
    assert torch.equal(hy.generate(s2, prompts, gen, seed=9).seq,
                       st.generate(s3, prompts, gen, seed=9).seq)


def _count_prefill_positions(hy) -> list:
    """Wrap the engine's prefill; the list collects the positions each call feeds."""
    calls, prefill = [], hy._prefill
    hy._prefill = lambda *a: (calls.append(a[2].shape[1]), prefill(*a))[1]
    return calls


@pytest.mark.parametrize("preset", FAMILIES)
def test_prefill_runs_the_linears_on_real_tokens_only(preset, monkeypatch):
    """Left padding is not computed: each layer's first linear in prefill takes as many rows
    as the prompts have real tokens (the answers still equal hf's: the parity tests)."""
    b, cfg = make_bundle(preset), make_cfg(preset=preset, batch=6, prompt_len=12)
    prompts = make_prompts(b, cfg, seed=3)
    real = int(prompts.attention_mask.sum())
    assert real < prompts.attention_mask.numel()   # some padding to skip
    hy = engines.get("hybrid", prefill_tokens=24, prefill_min_positions=1)  # chunks of 4
    s = hy.init(b, cfg, seed=0)
    first = D.extract(b.actor).layers[0].qkv[0].w
    rows, lin = [], D.lin
    monkeypatch.setattr(D, "lin", lambda x, L, *a, **k: (
        rows.append(x.reshape(-1, x.shape[-1]).shape[0]) if L.w is first else None,
        lin(x, L, *a, **k))[1])
    stacked, stack = [], K.decode_stack   # OPT's decode steps: every layer in one call
    monkeypatch.setattr(K, "decode_stack", lambda x, *a: (stacked.append(x.shape[0]),
                                                          stack(x, *a))[1])
    hy.generate(s, prompts, GenerationConfig(gen_len=3), seed=0)
    assert rows[:3] == [int(c.sum()) for c in prompts.attention_mask.split(4, dim=1)]
    assert sum(rows[:3]) == real and rows[3:] + stacked == [6, 6]  # two decode steps, every row


@pytest.mark.parametrize("preset", FAMILIES)
def test_chunked_prefill_equals_whole_prefill(preset):
    """Prefill in chunks of 2 positions (left padding fills whole chunks of some rows) gives
    the tokens and log-probs of one whole-prompt prefill."""
    b, cfg = make_bundle(preset), make_cfg(preset=preset, batch=4, prompt_len=8)
    prompts = make_prompts(b, cfg, seed=3)
    assert not prompts.attention_mask[:, :2].all()  # some row starts with padding
    runs, chunks = [], []
    for tokens in (256, 2 * cfg.batch):
        hy = engines.get("hybrid", prefill_tokens=tokens, prefill_min_positions=1)
        s = hy.init(b, cfg, seed=0)
        calls = _count_prefill_positions(hy)
        greedy = hy.generate(s, prompts, GenerationConfig(gen_len=12, greedy=True), seed=0)
        chunks.append(list(calls))
        sampled = hy.generate(s, prompts, GenerationConfig(gen_len=12), seed=4)
        runs.append((greedy.seq, sampled.seq, hy.answer_logprobs(s, greedy)))
    assert chunks == [[8], [2, 2, 2, 2]]  # one whole prefill, then 2 positions x 4 rows each
    (g1, s1, lp1), (g2, s2, lp2) = runs
    assert torch.equal(g1, g2) and torch.equal(s1, s2)
    assert torch.allclose(lp1, lp2, atol=1e-5)


def test_prefill_chunks_hold_1024_tokens_and_16_positions():
    b, cfg = make_bundle("tiny-opt"), make_cfg(batch=128, prompt_len=40)
    hy = engines.get("hybrid")
    s = hy.init(b, cfg, seed=0)
    calls = _count_prefill_positions(hy)
    # 1024 // 128 = 8 positions: raised to 16; 1024 // 32 = 32; 1024 // 4 = 256 covers 40
    for batch in (128, 32, 4):
        p = make_prompts(b, make_cfg(batch=batch, prompt_len=40), seed=0)
        hy.generate(s, p, GenerationConfig(gen_len=2), seed=0)
    assert calls == [16, 16, 8, 32, 8, 40]


def test_parity_probe_replays_the_compiled_decode_step():
    """answer_logprobs feeds the decode step columns of a rollout; they must reach it with the
    strides of generate's tokens, or the compiled step compiles again (on GPU: a second inductor
    compile and CUDA-graph capture inside the parity probe, and a different graph checked)."""
    b, cfg = make_bundle("tiny-opt"), make_cfg()
    hy = engines.get("hybrid", static=True)
    s = hy.init(b, cfg, seed=0)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward
    torch._dynamo.reset()
    hy._decode = torch.compile(D.decode_static_, backend=backend, fullgraph=True, dynamic=False)
    rollout = hy.generate(s, make_prompts(b, cfg, seed=2), GenerationConfig(gen_len=8), seed=0)
    hy.answer_logprobs(s, rollout)
    assert len(compiles) == 1


@pytest.mark.parametrize("block", [LF.FOLD_BLOCK, 97])   # whole weights, and many row blocks
@pytest.mark.parametrize("preset", FAMILIES)
def test_lora_fused_for_generation_then_restored_bit_for_bit(preset, block, monkeypatch):
    """Inside lora_fused the base weights hold W + scale * B @ A (a fused linear equals the
    unfused one); afterwards every parameter is bit-identical to before, also when the
    generate inside raises."""
    monkeypatch.setattr(LF, "FOLD_BLOCK", block)
    b = make_bundle(preset, seed=0, lora_dim=4)
    _nudge_lora(b)
    with torch.no_grad():  # adapters as large as the weights: many inexact W + d - d
        for n, p in b.actor.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
    before = params_of(b.actor)
    w = D.extract(b.actor)
    L = w.layers[0].qkv[0]
    x = torch.randn(3, L.a.shape[1])
    w0 = L.w.detach().clone()
    with torch.no_grad():
        unfused = D.lin(x, L)
    with torch.no_grad():  # the fix-up path really runs: some W + d - d differ from W
        inexact = sum(int(((Lo.w + d) - d != Lo.w).sum()) for Lo in D.lins(w)
                      if Lo is not None and Lo.a is not None
                      for d in [LF._delta(Lo, 0, Lo.w.shape[0], LF._Scratch())])
    assert inexact > 0
    with LF.lora_fused(w) as fw:
        assert not LF.has_lora(fw) and LF.has_lora(w)
        assert not torch.equal(L.w, w0)
        with torch.no_grad():
            assert (D.lin(x, fw.layers[0].qkv[0]) - unfused).abs().max() < 1e-4
    for n, p in b.actor.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="boom"):
        with LF.lora_fused(w):
            raise RuntimeError("boom")
    for n, p in b.actor.named_parameters():
        assert torch.equal(p, before[n]), n


def test_lora_auto_fuses_only_long_generations():
    hy = engines.get("hybrid")
    b = make_bundle("tiny-opt", seed=0, lora_dim=4)
    w = D.extract(b.actor)
    assert hy._fuse_lora(w, hy.LORA_FUSE_MIN_TOKENS) and not hy._fuse_lora(w, 2)
    assert not engines.get("hybrid", lora_mode="unfused")._fuse_lora(w, 1000)
    assert not hy._fuse_lora(D.extract(make_bundle("tiny-opt", seed=0).actor), 1000)
    with pytest.raises(ValueError, match="lora_mode must be"):
        engines.get("hybrid", lora_mode="sometimes")


def test_lora_on_bf16_weights_folds_exactly_and_runs_unfused():
    """PEFT keeps the adapters of a bf16 model in fp32: the unfused path mixes the dtypes as
    PEFT does, and folding works in the weights' dtype and still restores them bit for bit."""
    b = make_bundle("tiny-opt", seed=0, lora_dim=4, dtype=torch.bfloat16)
    _nudge_lora(b)
    w = D.extract(b.actor)
    L = w.layers[0].qkv[0]
    assert L.w.dtype == torch.bfloat16 and L.a.dtype == torch.float32
    before = params_of(b.actor)
    x = torch.randn(4, L.w.shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        want = b.actor.get_base_model().model.decoder.layers[0].self_attn.q_proj(x)
        unfused = D.lin(x, L)
        assert unfused.dtype == torch.bfloat16
        assert (unfused.float() - want.float()).abs().max() < 0.05 * want.float().abs().max()
        with LF.lora_fused(w) as fw:
            folded = D.lin(x, fw.layers[0].qkv[0])
            assert (folded.float() - want.float()).abs().max() < 0.05 * want.float().abs().max()
    for n, p in b.actor.named_parameters():
        assert torch.equal(p, before[n]), n


def test_failed_compiled_decode_falls_back_to_eager_and_says_so():
    """On a GPU the decode step is compiled (CUDA graphs); if compiling or capturing fails, the
    generate goes on eagerly with the same tokens, and the engine's note says what happened."""
    b, cfg, hf, s1, hy, s2 = _pair("tiny-opt", "hybrid")
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("capture failed\nsecond line")
    hy._decode = broken
    prompts = make_prompts(b, cfg, seed=2)
    gen = GenerationConfig(gen_len=16)
    assert torch.equal(hy.generate(s2, prompts, gen, seed=4).seq,
                       hf.generate(s1, prompts, gen, seed=4).seq)
    assert calls == [1] and hy._decode is D.decode_static_
    assert hy.note == "compiled decode failed, decode ran eager: RuntimeError: capture failed"
