"""The fused decode stack (K.decode_stack) against the decoder's layer loop: the same values
bit for bit, logits and cache, and taken only where it applies."""
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from core.data import synthetic_prompts
from core.models import build_bundle, position_ids
from engines import decoder as D
from engines import kernels as K

pytestmark = pytest.mark.skipif(not K.available(), reason="the CPU kernels do not build here")


def post_norm_opt(dtype):
    """OPT with the norms after each block and a projection in and out (opt-350m's shape),
    small."""
    cfg = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=160,
                    num_attention_heads=4, max_position_embeddings=64,
                    do_layer_norm_before=False, word_embed_proj_dim=32, dropout=0.0,
                    attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).to(dtype).eval()


def decode(w, dtype, vocab, pad, batch, fused, monkeypatch, steps=4, P=12):
    """Prefill then `steps` greedy decode steps: (the steps' logits, the cache)."""
    prompts = synthetic_prompts(batch, P, vocab, pad, seed=batch)
    pos = position_ids(prompts.attention_mask)
    cache = D.new_cache(w, batch, P + steps, dtype, "cpu")
    key_mask = torch.ones(batch, P + steps, dtype=torch.bool)
    key_mask[:, :P] = prompts.attention_mask.bool()
    calls = []
    real = K.decode_stack
    monkeypatch.setattr(K, "decode_stack", lambda *a: calls.append(1) or real(*a))
    if not fused:
        monkeypatch.setattr(D, "stack_applies", lambda *a: False)
    out = []
    with torch.no_grad():
        logits = D.forward_(w, cache, prompts.input_ids, pos, 0, key_mask)
        for t in range(steps):
            tok = logits.float().argmax(-1)[:, None]
            logits = D.forward_(w, cache, tok, pos[:, -1:] + 1 + t, P + t, key_mask)
            out.append(logits)
    monkeypatch.undo()
    assert len(calls) == (steps if fused else 0)
    return torch.stack(out), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["pre-norm", "post-norm"])
@pytest.mark.parametrize("batch", [1, 5, 9])
def test_decode_stack_is_the_layer_loop_bit_for_bit(dtype, shape, batch, monkeypatch):
    if shape == "pre-norm":
        b = build_bundle("tiny-opt", seed=0, dtype=dtype, actor_only=True)
        model, vocab, pad = b.actor, b.config.vocab_size, b.pad_id
    else:
        model, vocab, pad = post_norm_opt(dtype), 128, 1
    w = D.extract(model)
    with torch.no_grad():
        assert D.stack_applies(w, batch)
    fused, fused_cache = decode(w, dtype, vocab, pad, batch, True, monkeypatch)
    loop, loop_cache = decode(w, dtype, vocab, pad, batch, False, monkeypatch)
    assert torch.equal(fused, loop)
    for a, b in zip(fused_cache.k + fused_cache.v, loop_cache.k + loop_cache.v):
        assert torch.equal(a, b)


def test_decode_stack_applies_only_where_it_computes_the_same():
    opt = D.extract(build_bundle("tiny-opt", seed=0, actor_only=True).actor)
    llama = D.extract(build_bundle("tiny-llama", seed=0, actor_only=True).actor)
    with torch.no_grad():
        assert D.stack_applies(opt, 1)
        assert not D.stack_applies(opt, K.max_rows(torch.float32) + 1)  # past the kernel's rows
        assert not D.stack_applies(llama, 1)                            # RoPE, RMS norms, gate
        lora = D.map_lins(opt, lambda L: L if L is None else L._replace(
            a=torch.zeros(2, L.w.shape[1]), bb=torch.zeros(L.w.shape[0], 2)))
        assert not D.stack_applies(lora, 1)                             # LoRA unfused
        half = D.extract(build_bundle("tiny-opt", seed=0, dtype=torch.float16,
                                      actor_only=True).actor)
        assert not D.stack_applies(half, 1)                             # fp16: no kernels
    assert not D.stack_applies(opt, 1)                                  # gradients on
