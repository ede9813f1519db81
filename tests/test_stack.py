"""engines/stack.py's one-call decode step against the decoder's layer loop (forward_): the same
values bit for bit, logits and cache, and taken only where it applies."""
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

import engines
from conftest import make_bundle, make_cfg, make_prompts
from core.data import synthetic_prompts
from core.models import build_bundle, position_ids
from core.types import GenerationConfig
from engines import decoder as D
from engines import kernels as K
from engines import stack as DS

pytestmark = pytest.mark.skipif(not K.available(), reason="the CPU kernels do not build here")


def small_opt(dtype, **kw):
    """A small OPT; by default with the norms after each block and a projection in and out
    (opt-350m's shape)."""
    cfg = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=160,
               num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=False,
               word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
               bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**{**cfg, **kw})).to(dtype).eval()


MODELS = {
    "pre-norm": lambda dt: build_bundle("tiny-opt", seed=0, dtype=dt, actor_only=True).actor,
    "post-norm": small_opt,
    "no biases or norm weights": lambda dt: small_opt(dt, enable_bias=False,
                                                     layer_norm_elementwise_affine=False,
                                                     do_layer_norm_before=True),
}


def run(w, dtype, batch, fused, steps=4, P=12):
    """Prompts fed one position a row at a time (a chunk of one: left padding at the slot in
    the first positions, no logits), then `steps` greedy decode steps: (every logits, cache)."""
    prompts = synthetic_prompts(batch, P, 128, 1, seed=batch)
    pos = position_ids(prompts.attention_mask)
    cache = D.new_cache(w, batch, P + steps, dtype, "cpu")
    key_mask = torch.ones(batch, P + steps, dtype=torch.bool)
    key_mask[:, :P] = prompts.attention_mask.bool()
    f = DS.step if fused else D.forward_
    out = []
    with torch.no_grad():
        for s in range(P):
            logits = f(w, cache, prompts.input_ids[:, s:s + 1], pos[:, s:s + 1], s, key_mask,
                       s == P - 1)
            assert (logits is None) == (s < P - 1)
        for t in range(steps):
            out.append(logits)
            tok = logits.float().argmax(-1)[:, None]
            logits = f(w, cache, tok, pos[:, -1:] + 1 + t, P + t, key_mask)
    return torch.stack(out), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("batch", [1, 5, 9, 17])
def test_one_call_step_is_the_layer_loop_bit_for_bit(dtype, model, batch):
    if batch > K.max_rows(dtype):
        pytest.skip(f"{batch} rows are past the kernel's {K.max_rows(dtype)} on this CPU")
    w = D.extract(MODELS[model](dtype))
    with torch.no_grad():
        assert DS.applies(w, batch)
    fused, fused_cache = run(w, dtype, batch, True)
    loop, loop_cache = run(w, dtype, batch, False)
    assert torch.equal(fused, loop)
    for a, b in zip(fused_cache.k + fused_cache.v, loop_cache.k + loop_cache.v):
        assert torch.equal(a, b)


def test_one_call_step_applies_only_where_it_computes_the_same():
    opt = D.extract(build_bundle("tiny-opt", seed=0, actor_only=True).actor)
    llama = D.extract(build_bundle("tiny-llama", seed=0, actor_only=True).actor)
    with torch.no_grad():
        assert DS.applies(opt, 1)
        assert not DS.applies(opt, K.max_rows(torch.float32) + 1)  # past the kernel's rows
        assert not DS.applies(llama, 1)                            # RoPE, RMS norms, gate
        lora = D.map_lins(opt, lambda L: L if L is None else L._replace(
            a=torch.zeros(2, L.w.shape[1]), bb=torch.zeros(L.w.shape[0], 2)))
        assert not DS.applies(lora, 1)                             # LoRA unfused
        half = D.extract(build_bundle("tiny-opt", seed=0, dtype=torch.float16,
                                      actor_only=True).actor)
        assert not DS.applies(half, 1)                             # fp16: no kernels
        l0 = opt.layers[0]
        mixed = opt._replace(layers=(l0._replace(ln1=l0.ln1._replace(w=l0.ln1.w.double())),
                                     *opt.layers[1:]))
        assert not DS.applies(mixed, 1)                            # a norm in another dtype
    assert not DS.applies(opt, 1)                                  # gradients on


def test_hybrid_generates_through_the_one_call_step(monkeypatch):
    """hybrid's decode steps on an OPT model go through it, and give the tokens of the loop."""
    b = make_bundle("tiny-opt")
    cfg = make_cfg(preset="tiny-opt", batch=3, prompt_len=8)
    prompts, gen = make_prompts(b, cfg, seed=1), GenerationConfig(gen_len=5, greedy=True)
    hy = engines.get("hybrid")
    state = hy.init(b, cfg, seed=0)
    calls, real = [], DS.step
    monkeypatch.setattr(DS, "step", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = hy.generate(state, prompts, gen, seed=0).seq
    assert len(calls) == gen.gen_len - 1
    monkeypatch.setattr(DS, "applies", lambda *a: False)
    assert torch.equal(fused, hy.generate(state, prompts, gen, seed=0).seq)
    assert len(calls) == gen.gen_len - 1
