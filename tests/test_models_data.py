"""Model presets and bundles, synthetic and JSONL prompts, reward rules."""
from __future__ import annotations

import json

import pytest
import torch

from core.data import jsonl_prompts, synthetic_prompts
from core.models import PRESETS, ModelError, build_bundle
from core.rewards import model_score, rule_score

TINY = ["tiny-opt", "tiny-llama", "tiny-qwen2", "tiny-gpt2"]


def _n_params(module):
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_bundle(preset, tiny_bundle, no_network):
    rng_before = torch.get_rng_state()
    b = tiny_bundle(preset, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG left alone
    for m in (b.actor, b.ref, b.critic, b.reward):
        assert 10_000 < _n_params(m) < 2_000_000
        assert not m.training  # eval mode: no dropout anywhere
    # reference == initial actor, frozen; critic == reward, reward frozen; separate storage
    assert _same(b.actor, b.ref) and _same(b.critic, b.reward)
    assert not any(p.requires_grad for p in b.ref.parameters())
    assert not any(p.requires_grad for p in b.reward.parameters())
    assert all(p.requires_grad for p in b.actor.parameters())
    assert all(p.requires_grad for p in b.critic.parameters())
    a_ptrs = {p.data_ptr() for p in b.actor.parameters()}
    assert a_ptrs.isdisjoint(p.data_ptr() for p in b.ref.parameters())
    c_ptrs = {p.data_ptr() for p in b.critic.parameters()}
    assert c_ptrs.isdisjoint(p.data_ptr() for p in b.reward.parameters())
    assert b.config.vocab_size == 512
    # the critic's value head gives one float per token
    ids = torch.randint(3, 512, (2, 5))
    assert b.critic(ids, torch.ones_like(ids)).shape == (2, 5)


@pytest.mark.parametrize("preset", TINY)
def test_bundle_seeding(preset, tiny_bundle):
    a, b, c = tiny_bundle(preset, seed=3), tiny_bundle(preset, seed=3), tiny_bundle(preset, seed=4)
    for name in ("actor", "ref", "critic", "reward"):
        assert _same(getattr(a, name), getattr(b, name)), name
        assert not _same(getattr(a, name), getattr(c, name)), name
    # actor and reward are initialised from different seeds: their shared bases differ
    assert not torch.equal(a.actor.get_input_embeddings().weight,
                           a.reward.base.get_input_embeddings().weight)


@pytest.mark.parametrize("preset", TINY)
def test_presets_give_biases_and_norm_scales_real_values(preset, tiny_bundle):
    """HF initialises biases at 0 and norm weights at 1: left so, an engine that dropped one
    would agree with hf. Every 1-D tensor of the actor and the reward model varies."""
    b = tiny_bundle(preset, seed=0)
    for m in (b.actor, b.reward):
        vecs = {n: p for n, p in m.named_parameters() if p.dim() == 1}
        assert vecs and all(float(p.std()) > 0.01 for p in vecs.values()), preset


@pytest.mark.parametrize("preset,count", [("opt-125m", 125_239_296), ("opt-350m", 331_196_416),
                                          ("opt-1.3b", 1_315_758_080),
                                          ("qwen2.5-0.5b", 494_032_768)])
def test_real_shape_presets_have_the_published_models_parameter_counts(preset, count):
    """A real-shape preset is the model it is named after, tensor for tensor: its parameter
    count (tied heads once) is the published checkpoint's. Built on the meta device."""
    from transformers import AutoModelForCausalLM

    from core.models import build_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(preset))
    assert sum(p.numel() for p in model.parameters()) == count


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ModelError) as e:
        build_bundle("tiny-nope", seed=0)
    msg = str(e.value)
    assert "tiny-nope" in msg
    for name in PRESETS:
        assert name in msg


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        build_bundle(str(tmp_path / "missing" / "model"), seed=0)
    with pytest.raises(ModelError):  # a folder that holds no model
        build_bundle(str(tmp_path), seed=0)


def test_local_hf_path(tmp_path, tiny_bundle, no_network):
    src = tiny_bundle("tiny-opt", seed=7)
    src.actor.save_pretrained(tmp_path)
    b = build_bundle(str(tmp_path), seed=0)
    assert _same(b.actor, src.actor)  # the checkpoint's weights, not a fresh init
    assert _same(b.ref, b.actor) and _same(b.critic, b.reward)
    assert not any(p.requires_grad for p in b.ref.parameters())
    base = b.reward.base.state_dict()
    for k, v in src.actor.model.state_dict().items():  # reward base loaded from the same weights
        assert torch.equal(base[k], v), k
    assert b.pad_id == src.pad_id and b.eos_id == src.eos_id
    ids = torch.randint(3, 512, (2, 6))
    torch.testing.assert_close(b.actor(input_ids=ids).logits, src.actor(input_ids=ids).logits)


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama"])
def test_local_folder_loads_quietly_but_still_reports_a_foreign_key(preset, tmp_path, tiny_bundle,
                                                                   caplog, capfd, no_network):
    """The reward and critic bases leave the folder's LM head unused: not worth a load report.
    A key that belongs nowhere still gets one, and the class is left as it was."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    src = tiny_bundle(preset, seed=7)
    head = src.actor.get_output_embeddings()          # untie it: lm_head.weight, a key of its own
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    src.actor.config.tie_word_embeddings = False
    src.actor.save_pretrained(tmp_path)
    def report():  # transformers' warnings reach stderr or, once propagated, pytest's log capture
        text = caplog.text + capfd.readouterr().err
        caplog.clear()
        return text
    report()
    build_bundle(str(tmp_path), seed=0)
    text = report()
    assert "LOAD REPORT" not in text and "lm_head" not in text
    cls = AutoModel._model_mapping[type(src.config)]
    assert "_keys_to_ignore_on_load_unexpected" not in cls.__dict__
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "model.stray.weight": torch.zeros(2)}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    build_bundle(str(tmp_path), seed=0)
    text = report()
    assert "stray" in text and "UNEXPECTED" in text


# ----------------------------------------------------------------------------- prompts

def test_synthetic_prompts_left_padded_and_seeded():
    B, P, pad = 8, 16, 1
    p = synthetic_prompts(B, P, 512, pad, seed=0)
    ids, mask = p.input_ids, p.attention_mask
    assert ids.shape == mask.shape == (B, P) and ids.dtype == mask.dtype == torch.int64
    assert torch.all(mask[:, 1:] >= mask[:, :-1])        # 0s only on the left
    assert torch.all(mask[:, -1] == 1)                   # every prompt ends at the right edge
    assert torch.all(ids[mask == 0] == pad) and torch.all(ids[mask == 1] != pad)
    lengths = mask.sum(-1)
    assert int(lengths.max()) == P and int(lengths.min()) >= P // 2
    assert len(set(lengths.tolist())) > 1                # varied true lengths
    q = synthetic_prompts(B, P, 512, pad, seed=0)
    assert torch.equal(q.input_ids, ids) and torch.equal(q.attention_mask, mask)
    r = synthetic_prompts(B, P, 512, pad, seed=1)
    assert not torch.equal(r.input_ids, ids)


@pytest.fixture
def word_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "a": 4, "b": 5, "c": 6}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    path = tmp_path / "tok"
    fast.save_pretrained(path)
    return str(path)


def test_jsonl_prompts(tmp_path, word_tokenizer, no_network):
    data = tmp_path / "prompts.jsonl"
    rows = ["hello world", "a b c a b c", "c zzz"]
    data.write_text("\n".join(json.dumps({"prompt": t}) for t in rows) + "\n\n")
    # expected encodings, cut to the last 4 tokens and left-padded with [PAD]=0
    enc = {(0, 0, 2, 3): (0, 0, 1, 1),            # hello world
           (6, 4, 5, 6): (1, 1, 1, 1),            # a b c a b c -> last 4: c a b c
           (0, 0, 6, 1): (0, 0, 1, 1)}            # c zzz (zzz unknown)
    p = jsonl_prompts(str(data), word_tokenizer, batch=5, prompt_len=4, seed=0)
    assert p.input_ids.shape == p.attention_mask.shape == (5, 4)
    got = [tuple(r) for r in p.input_ids.tolist()]
    for ids, m in zip(got, p.attention_mask.tolist()):
        assert enc[ids] == tuple(m)
    assert sorted(got[:3]) == sorted(enc)         # the first 3 rows are a permutation of the file
    assert got[3:] == got[:2]                     # then it wraps around in the same order
    again = jsonl_prompts(str(data), word_tokenizer, batch=5, prompt_len=4, seed=0)
    assert torch.equal(again.input_ids, p.input_ids)
    others = [jsonl_prompts(str(data), word_tokenizer, batch=3, prompt_len=4, seed=s).input_ids
              for s in range(1, 6)]
    assert any(not torch.equal(o, p.input_ids[:3]) for o in others)


# ----------------------------------------------------------------------------- rewards

def test_rule_and_model_scores():
    answer = torch.tensor([[8, 3, 16, 24], [1, 2, 3, 4], [0, 8, 5, 7]])
    mask = torch.tensor([[True, True, True, False], [True] * 4, [True, True, False, False]])
    # row 0: 8, 16 of 3 valid -> 5 * 2/3; row 1: none -> 0; row 2: 0, 8 of 2 -> 5
    torch.testing.assert_close(rule_score(answer, mask), torch.tensor([10 / 3, 0.0, 5.0]))
    values = torch.arange(3 * 6, dtype=torch.float32).reshape(3, 6)  # (B, T), P = 2
    # the value at each answer's last valid token: positions 2+2, 2+3, 2+1
    torch.testing.assert_close(model_score(values, mask, 2), torch.tensor([4.0, 11.0, 15.0]))
