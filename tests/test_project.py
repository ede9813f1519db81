"""Scale projection (bench/projection/): hand counts on a toy shape, the DeepSpeed-Chat
calibration, and the command line. Pure arithmetic: the whole file runs in a few seconds on CPU."""
from __future__ import annotations

import argparse
import dataclasses

import pandas as pd
import pytest

from bench.flops import Shape, decode_step_bytes, forward_flops, kv_bytes, train_flops
from bench.projection import counts as C
from bench.projection import model as P
from bench.projection.calibration import calibration_table
from bench.projection.cli import (add_arguments, configs_from_args, format_projection, main,
                                  run_projection)
from bench.projection.measured import load_efficiency
from bench.projection.presets import ENGINES, GPUS, MODELS, Arch, Efficiency, Gpu

# A toy OPT-like shape small enough to count by hand: L=2, d=8, ffn=32, V=16, 16 positions.
TOY = Arch("toy", layers=2, d_model=8, heads=2, ffn=32, vocab=16, positions=16)
NO_CRITIC = Shape(0, 0, 0, 0, 0, 0)   # a forward of nothing: train_flops of the actor alone
# Round-number hardware: 1 TFLOP/s, 1 GB/s HBM, 0.1 GB/s NVLink.
TOY_GPU = Gpu("toy-gpu", bf16_flops=1e12, hbm_bw=1e9, memory=1e9, nvlink_bw=1e8, ib_bw=1e7,
              pcie_bw=1e9, host_bw=1e9)
# Every roofline reached, no fixed costs: times are exactly bytes / bandwidth or FLOPs / peak.
UNIT = Efficiency(prefill=1, decode=1, score=1, train=1, comm=1, pcie=1, host=1,
                  launch_s=0, token_sync_s=0, collective_latency_s=0, ring_base_s=0, ring_hop_s=0,
                  ring_net_hop_s=0)


@pytest.fixture
def toy(monkeypatch):
    """Register the toy shape and GPU; return a Config factory for them."""
    monkeypatch.setitem(MODELS, "toy", TOY)
    monkeypatch.setitem(GPUS, "toy-gpu", TOY_GPU)

    def make(**kw):
        base = dict(model="toy", critic="toy", gpu="toy-gpu", prompt_len=3, gen_len=2, eff=UNIT)
        return P.Config(**{**base, **kw})
    return make


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = []
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


# ------------------------------------------------------------------ counts by hand

def test_param_counts_match_hugging_face_opt():
    # sum(p.numel()) of transformers' OPTForCausalLM built from the real configs (checked once
    # on the meta device; not repeated here to keep the test free of a 6 s import)
    assert C.param_count(MODELS["opt-350m"]) == 331_196_416
    assert C.param_count(MODELS["opt-1.3b"]) == 1_315_758_080
    # per layer 4*64 + 2*8*32 + 9*8 + 32 = 872; 2 layers = 1744; embeddings 16*8 = 128;
    # positions (16+2)*8 = 144; final layernorm 2*8 = 16 -> 2032
    assert C.param_count(TOY) == 2032


# A toy of the Llama family: grouped-query attention (4 heads, 2 K/V heads: kv width 4), a gated
# MLP, RMSNorm, no biases, an untied head.
TOY_LLAMA = Arch("toy-llama", layers=2, d_model=8, heads=4, ffn=12, vocab=16, positions=16,
                 family="llama", kv_heads=2, tied=False)


def test_llama_family_counts_by_hand():
    s = TOY_LLAMA
    assert s.kv == 4 and s.gated
    # per layer q, o 8x8 each, k, v 8x4 each, gate, up, down 8x12 each: 128 + 64 + 288 = 480
    assert C.layer_matmul_params(s) == 480
    # 2 layers x (480 + 2 RMSNorms 2*8) + embedding 16*8 + untied head 16*8 + final norm 8
    assert C.param_count(s) == 2 * 496 + 128 + 128 + 8
    # Qwen2's q, k, v biases add 8 + 4 + 4 per layer; a tied head drops 128
    qwen = dataclasses.replace(s, qkv_bias=True, tied=True)
    assert C.param_count(qwen) == C.param_count(s) + 2 * 16 - 128
    assert C.matmul_params(s) == 2 * 480 + 128 and C.matmul_params(qwen) == C.matmul_params(s)
    # LoRA r=1: q, o r(8+8) each, k, v r(8+4) each, three MLP matrices r(8+12): 116 per layer
    assert C.lora_param_count(s, 1) == 232
    # the cache holds K and V 4 wide: batch 3 x 5 positions x 2 x 2 layers x 4 x 2 bytes
    assert kv_bytes(C.flop_shape(s), 3, 5, 2) == 480
    # activations of one token: attention 6*8 + 4*4, norms 4*8, gated MLP 2*8 + 8*12, scores 2*4
    # (no dropout in this family: no masks, and the softmax output alone kept of the scores)
    assert C.layer_activation_bytes(s, 1, 1) == 6 * 8 + 4 * 4 + 32 + 112 + 2 * 4
    # for an OPT shape the general terms are Korthikanti's s b d (34 + 5 a s / d)
    assert C.layer_activation_bytes(TOY, 3, 5) == 3 * 5 * 8 * (34 + 5 * 2 * 5 / 8)


def test_llama_family_shapes_match_hugging_face():
    """Every non-OPT shape, built by transformers on the meta device: parameter count, the
    weights a token multiplies through, K/V width; and the published totals."""
    import torch
    import transformers as T
    from bench.flops import shape_of
    published = {"llama-2-7b": 6_738_415_616, "llama-2-70b": 68_976_648_192,
                 "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
                 "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512}
    checked = 0
    for name, s in MODELS.items():
        if s.family == "opt":
            continue
        kw = dict(hidden_size=s.d_model, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                  num_attention_heads=s.heads, num_key_value_heads=s.kv_heads or s.heads,
                  vocab_size=s.vocab, max_position_embeddings=s.positions,
                  tie_word_embeddings=s.tied)
        config = T.Qwen2Config(**kw) if s.qkv_bias else T.LlamaConfig(**kw)
        with torch.device("meta"):
            model = T.AutoModelForCausalLM.from_config(config)
        hf = shape_of(model, config)
        assert C.param_count(s) == sum(p.numel() for p in model.parameters()), name
        assert C.matmul_params(s) == hf.linear_params and s.kv == hf.kv_width, name
        assert C.param_count(s) == published.get(name, C.param_count(s)), name
        checked += 1
    assert checked == 8


def test_critic_defaults_to_deepspeed_chats_or_the_actor(capsys):
    assert P.Config(model="opt-13b").critic == "opt-350m"
    assert P.Config(model="llama-3-8b").critic == "llama-3-8b"
    assert P.Config(model="llama-3-70b", critic="llama-3-8b").critic == "llama-3-8b"
    [cfg] = configs_from_args(_args(model="llama-2-13b", critic="llama-2-7b", gpus=8,
                                    gpu="h200"))
    assert cfg.critic == "llama-2-7b"
    # a smaller critic takes less memory and less training time
    own = P.predict(P.Config(model="llama-2-13b", gpus=8, gpu="h200", engine="hybrid"))
    small = P.predict(dataclasses.replace(cfg, engine="hybrid"))
    assert own["critic"] == "llama-2-13b" and small["critic"] == "llama-2-7b"
    assert small["mem_gib"] < own["mem_gib"] and small["train_s"] < own["train_s"]
    assert run_projection(_args(model="llama-3-8b,opt-1.3b", gpus=8)) == 0
    out = capsys.readouterr().out
    assert "critic and reward model: llama-3-8b -> llama-3-8b, opt-1.3b -> opt-350m" in out


def test_flop_and_byte_counts_by_hand():
    # weights a token multiplies through: 2 * (4*8*8 + 2*8*32) + LM head 16*8 = 1536 + 128
    assert C.matmul_params(TOY) == 1664
    assert C.matmul_params(TOY, lm_head=False) == 1536 + 8          # value head: 8 -> 1
    # one token, 5 positions: 2*1664 + 4 * L2 * d8 * ctx5 = 3328 + 320
    toy = C.flop_shape(TOY)
    assert forward_flops(toy, 1, 1, past=4) == 3648
    # 3 tokens causal: 2*1664*3 + 4*2*8*(1+2+3) = 9984 + 384, the sum of the three tokens
    assert forward_flops(toy, 1, 3) == 10368
    assert forward_flops(toy, 1, 3) == sum(forward_flops(toy, 1, 1, past=t - 1)
                                           for t in (1, 2, 3))
    # the LM head (16*8) kept at 1 of the 3 positions: 10368 - 2 * 128 * 2 = 9856
    assert forward_flops(toy, 1, 3, logits=1) == 9856
    # (prompt 3, answer 0: logits at 1 position; prompt 1, answer 2: at all 3)
    assert train_flops(toy, NO_CRITIC, 1, 3, 0, recompute=True) == 4 * 9856
    # train, full + checkpointing: fwd + 2 fwd backward + fwd recompute = 4 * 10368
    assert train_flops(toy, NO_CRITIC, 1, 1, 2, recompute=True) == 41472
    # LoRA r=2, adapters only, no checkpointing: 2 * 10368 + 6 * 576 adapter params * 3 tokens,
    # adapters = L2 * r2 * (4 * (8+8) + 2 * (8+32)) = 4 * 144 = 576
    assert C.lora_param_count(TOY, 2) == 576
    lora = C.flop_shape(TOY, adapters=576)
    assert train_flops(lora, NO_CRITIC, 1, 1, 2, trained=576) == 20736 + 10368
    # KV cache, batch 3 x 5 positions x (k, v) x 2 layers x d8 x 2 bytes = 960
    assert kv_bytes(toy, 3, 5, 2) == 960
    # a decode step reads all weights once (1664 * 2 bytes) plus the batch's KV cache
    assert decode_step_bytes(toy, 3, 5, 2) == 3328 + 960


def test_communication_counts_by_hand(toy):
    # one bf16 copy 2032 * 2 = 4064 bytes; each of 4 ranks receives 3/4 of it
    assert C.zero3_gather_bytes(TOY, 4) == 3048
    z3 = toy(gpus=4, zero_stage=3)
    # hf gathers for every forward (prefill + 1 decode step = 2); the hybrids once; ds-inference
    # generates from its own copy; nothing is sharded at stage 2 or on one GPU
    gathers = [P.generate_gathers(dataclasses.replace(z3, engine=e)) for e in ENGINES]
    assert dict(zip(ENGINES, gathers)) == {"hf": 2, "ds-inference": 0, "ds-hybrid": 1,
                                             "hybrid": 1}
    assert P.generate_gathers(dataclasses.replace(z3, zero_stage=2)) == 0
    assert P.generate_gathers(dataclasses.replace(z3, gpus=1)) == 0
    # score: actor, reference, critic, reward (all the toy here) gathered once: 4 * 3048
    assert P.score_comm_bytes(z3) == 12192
    # train: reduce-scatter of bf16 grads of actor + critic (4064 params * 2 B * 3/4 = 6096)
    # + gathers of actor and critic for forward, recompute and backward: 3 * 2 * 3048
    assert P.train_comm_bytes(z3) == 6096 + 18288
    assert P.train_comm_bytes(dataclasses.replace(z3, grad_ckpt=False)) == 6096 + 12192
    assert P.train_comm_bytes(dataclasses.replace(z3, zero_stage=2)) == 2 * 6096   # all-reduce
    # LoRA-only r=2: grads of 576 adapters + 2032 critic params; the frozen base is still gathered
    assert P.train_comm_bytes(dataclasses.replace(z3, lora_dim=2)) == 2608 * 2 * 0.75 + 18288


def test_decode_roofline_and_gathers_by_hand(toy):
    cfg = toy(engine="hybrid", zero_stage=0)
    # prefill: max(10368 FLOPs / 1e12, 1664*2 B / 1e9) = 3.328e-6 s
    # decode step 1: reads 3328 B of weights + KV of 3 positions (1*3*2*2*8*2 = 192 B) = 3.520e-6 s
    work, comm = P.generate_time(cfg, b=1)
    assert work == pytest.approx(3.328e-6 + 3.520e-6) and comm == 0
    # unfused LoRA r=2 (hybrid, hf) also reads the 576 adapter weights (1152 B) each forward;
    # DeepSpeed fuses them, so ds-hybrid's time is unchanged
    work, _ = P.generate_time(toy(engine="hybrid", zero_stage=0, lora_dim=2), b=1)
    assert work == pytest.approx(4.480e-6 + 4.672e-6)
    work, _ = P.generate_time(toy(engine="ds-hybrid", zero_stage=0, lora_dim=2), b=1)
    assert work == pytest.approx(6.848e-6)
    # answers of 48+ tokens: hybrid folds the adapters like DeepSpeed, plus ~4 passes over the
    # decoder weights (1544 of them, no LM head): 4 * 1544 * 2 B at 1 GB/s
    from engines.hybrid import HybridEngine
    long = dict(zero_stage=0, lora_dim=2, gen_len=HybridEngine.LORA_FUSE_MIN_TOKENS)
    folded, _ = P.generate_time(toy(engine="hybrid", **long), b=1)
    ds, _ = P.generate_time(toy(engine="ds-hybrid", **long), b=1)
    assert folded == pytest.approx(ds + 4 * C.matmul_params(C.model_arch("toy"), False) * 2 / 1e9)
    unfused, _ = P.generate_time(toy(engine="hf", **long), b=1)
    assert unfused > folded
    # ZeRO-3 on 4 GPUs: a gather moves 3048 B over 0.1 GB/s = 3.048e-5 s.
    # hybrid pays it once; hf per forward, less the step it hides behind:
    # (3.048e-5 - 3.328e-6) + (3.048e-5 - 3.520e-6) = 5.4112e-5 s
    _, comm = P.generate_time(toy(engine="hybrid", gpus=4), b=1)
    assert comm == pytest.approx(3.048e-5)
    _, comm = P.generate_time(toy(engine="hf", gpus=4), b=1)
    assert comm == pytest.approx(5.4112e-5)
    # ds-inference re-copies its 4064 B (read + write, 8128 B at 1 GB/s) and gathers once
    assert P.sync_time(toy(engine="ds-inference", gpus=4)) == pytest.approx(8.128e-6 + 3.048e-5)


def test_memory_by_hand(toy):
    m = P.memory_per_gpu(toy(gpus=4, zero_stage=3, engine="hybrid"), b=1)
    # ZeRO-3 over 4: bf16 weights 2032*2/4, bf16 grads the same, Adam 2032*12/4
    assert (m["actor_weights"], m["actor_grads"], m["actor_adam"]) == (1016, 1016, 6096)
    assert m["ref_weights"] == m["reward_weights"] == 1016
    assert m["critic"] == 1016 + 1016 + 6096
    # the static KV cache stays: 1 prompt x (3+2) positions x 2 x 2 layers x 8 x 2 B
    assert m["kv_cache"] == 320 and m["inference_copy"] == 0
    # stage 1 shards only Adam; offload moves grads and Adam to the host
    m1 = P.memory_per_gpu(toy(gpus=4, zero_stage=1), b=1)
    assert (m1["actor_weights"], m1["actor_grads"], m1["actor_adam"]) == (4064, 4064, 6096)
    assert P.memory_per_gpu(toy(gpus=4, offload=True), b=1)["actor_adam"] == 0
    # ds-inference holds a second full copy
    assert P.memory_per_gpu(toy(engine="ds-inference"), b=1)["inference_copy"] == 4064


# ------------------------------------------------------------------ the calibration

def test_calibration_reproduces_deepspeed_chat_within_1_5x(capsys):
    assert run_projection(_args(calibration=True)) == 0
    printed = capsys.readouterr().out
    # assumptions beside each prediction
    for column in ("batch", "zero", "tp", "lora", "offload", "efficiency", "hours",
                   "published_hours", "ratio"):
        assert column in printed.splitlines()[0]
    df = calibration_table()
    cal = df[df["set"] == "calibration"]
    assert len(cal) == 11 and (cal["engine"] == "ds-hybrid").all() and cal["fits"].all()
    assert cal["efficiency"].nunique() == 1                   # one set of efficiencies for all rows
    bad = cal[(cal["ratio"] > 1.5) | (cal["ratio"] < 1 / 1.5)]
    assert bad.empty, format_projection(bad)


def test_token_arithmetic():
    # 135e6 tokens / (256 + 256) = 263,672 prompts (DeepSpeed-Chat: 264,292 x 512 = 135.3M)
    row = P.predict(P.Config(model="opt-1.3b", gpus=8, batch=128, zero_stage=2))
    assert row["total_hours"] == pytest.approx(-(-263_672 // 128) * row["step_s"] / 3600, rel=1e-3)


# ------------------------------------------------------------------ behaviour the model must show

def test_phases_move_the_right_way():
    base = dict(model="opt-13b", gpu="a100-80g", zero_stage=3, batch=512)
    hf64 = P.predict(P.Config(engine="hf", gpus=64, **base))
    hy64 = P.predict(P.Config(engine="hybrid", gpus=64, **base))
    assert hf64["dominant_phase"] == "comm" and hf64["comm_s"] > 10 * hy64["comm_s"]
    dsi = P.predict(P.Config(engine="ds-inference", gpus=8, **base))
    full = P.predict(P.Config(engine="hybrid", gpus=8, **base))
    assert dsi["sync_s"] > 0 and dsi["mem_gib"] > full["mem_gib"]         # the second copy
    lora = P.predict(P.Config(engine="hybrid", gpus=8, lora_dim=128, **base))
    assert lora["train_s"] < 0.8 * full["train_s"]
    h100 = P.predict(P.Config(engine="hybrid", gpus=8, **{**base, "gpu": "h100"}))
    h200 = P.predict(P.Config(engine="hybrid", gpus=8, **{**base, "gpu": "h200"}))
    # same peak FLOP/s, more HBM bandwidth: faster decode, the same training (Adam aside)
    assert h200["generate_s"] < h100["generate_s"]
    assert h200["train_s"] == pytest.approx(h100["train_s"], rel=0.01)


def test_largest_batch_fits_and_doubling_does_not():
    cfg = P.Config(model="opt-6.7b", gpus=8, gpu="a100-40g", engine="ds-hybrid")
    batch = P.largest_batch(cfg)
    per_gpu = batch // 8
    assert per_gpu & (per_gpu - 1) == 0 and P.memory_fit(cfg, per_gpu)
    assert batch == 1024 or not P.memory_fit(cfg, 2 * per_gpu)
    none = P.predict(P.Config(model="opt-175b", gpus=1, gpu="a100-40g"))
    assert none["batch"] == 0 and not none["fits"] and none["dominant_phase"].startswith("none")


# ------------------------------------------------------------------ command line

REQUIRED = ["model", "gpus", "gpu", "engine", "batch", "step_s", "generate_s", "sync_s", "score_s",
            "train_s", "comm_s", "total_hours", "dominant_phase", "fits"]


def test_out_csv_has_the_columns_and_is_written_atomically(tmp_path, capsys):
    out = tmp_path / "sub" / "p.csv"
    args = _args(model="opt-13b", gpus="8", engine="hf,ds-hybrid,hybrid", out=out)
    assert run_projection(args) == 0
    df = pd.read_csv(out)
    assert set(REQUIRED) <= set(df.columns) and len(df) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.csv"]     # no temp file left
    assert "opt-13b" in capsys.readouterr().out


def test_sweep_writes_a_png(tmp_path, capsys):
    png = tmp_path / "s.png"
    args = _args(sweep=True, model="opt-1.3b,opt-13b", gpus="1,8,64", engine="hf,hybrid",
                 inference_tp="auto", plot=png, out=tmp_path / "s.csv")
    assert run_projection(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(tmp_path / "s.csv")) == 12


def _run_dir(tmp_path, rows: str, meta: str = '{"env": {"gpu": "NVIDIA H200"}}'):
    (tmp_path / "summary.csv").write_text(rows)
    (tmp_path / "results.json").write_text(meta)
    return str(tmp_path)


def test_efficiency_read_from_a_harness_run(tmp_path):
    run_dir = _run_dir(tmp_path, "engine,status,gen_s,decode_roofline_frac,train_flops_frac\n"
                                 "hybrid,ok,1.0,0.2,\nhf,ok,2.0,0.1,0.3\n")
    eff, source = load_efficiency(run_dir, "hybrid")
    assert eff.decode == 0.2 and eff.train == Efficiency().train and "H200" in source
    assert load_efficiency(run_dir, "ds-hybrid")[1].startswith("defaults for ds-hybrid (")
    assert "has no ok row" in load_efficiency(run_dir, "ds-hybrid")[1]      # said, not hidden
    # the machine is the GPU's where the run had one, else the CPU's
    (tmp_path / "results.json").write_text('{"env": {"cpu": "Xeon"}, "rows": []}')
    assert "Xeon" in load_efficiency(run_dir, "hybrid")[1]
    base = P.Config(model="opt-1.3b", engine="hybrid", batch=16)
    slow = dataclasses.replace(base, eff=eff)
    assert P.predict(slow)["generate_s"] > 2 * P.predict(base)["generate_s"]


@pytest.mark.parametrize("kw, match", [
    (dict(model="opt-7b"), "unknown model"),
    (dict(gpu="v100"), "unknown gpu"),
    (dict(engine="vllm"), "unknown engine"),
    (dict(engine="hf", inference_tp="2", gpus="2"), "inference-tp"),
    (dict(engine="ds-hybrid", inference_tp="3", gpus="4"), "inference-tp"),
    (dict(gpus="8", batch="12"), "multiple"),
    (dict(tokens="0"), "tokens"),
    (dict(prompt_len="2000"), "positions"),
    (dict(gpus="two"), "integers"),
    (dict(gpus="100000000000"), "need --gpus from 1 to 100,000"),
    (dict(model="opt-1.3b", lora_dim="2049"), "larger than opt-1.3b's layer width 2048"),
    (dict(model="opt-350m", lora_dim="600"), "larger than opt-350m's layer width 512"),
    (dict(model="llama-3-8b", lora_dim="4097"), "larger than llama-3-8b's layer width 4096"),
    (dict(model="llama-3-8b", critic="llama-4"), "unknown model 'llama-4'"),
    (dict(model="llama-3-8b", critic="opt-350m"), "--critic opt-350m reads opt's tokens, "
                                                  "llama-3-8b writes llama-3's"),
    (dict(model="llama-2-7b", critic="opt-350m", prompt_len="3000"), "positions"),
])
def test_bad_input_is_a_one_line_value_error(kw, match, capsys):
    with pytest.raises(ValueError, match=match) as err:
        run_projection(_args(**kw))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rows, meta, match", [
    (None, None, "cannot read"),
    ("engine,decode_roofline_frac\nhybrid,0.5\n", "[1, 2", "cannot read"),
    ("name,decode_roofline_frac\nhybrid,0.5\n", "{}", "'engine' column"),
    ("engine,decode_roofline_frac\nhybrid,0.5\n", "[]", "must be an object"),
    ("engine,decode_roofline_frac\nhybrid,3.5\n", "{}", "not a fraction"),
])
def test_bad_efficiency_dir_is_a_one_line_value_error(tmp_path, rows, meta, match):
    run_dir = str(tmp_path / "missing") if rows is None else _run_dir(tmp_path, rows, meta)
    with pytest.raises(ValueError, match=match) as err:
        run_projection(_args(engine="hybrid", efficiency=run_dir))
    assert "\n" not in str(err.value)


def test_stand_alone_entry_exits_2_on_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "opt-7b"])
    assert exit_.value.code == 2 and "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--nonsense"])  # a usage mistake: one line, as rlhf-bench project gives
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--nonsense" in err, err


@pytest.mark.parametrize("flag", ["out", "plot"])
def test_out_or_plot_naming_a_folder_is_refused_up_front(flag, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"--{flag} {tmp_path} is a folder; give a file name"):
        run_projection(_args(model="opt-1.3b", **{flag: tmp_path}))
    assert capsys.readouterr().out == ""   # nothing computed or printed first


def test_readme_projection_table_is_what_its_command_prints(tmp_path, capsys):
    """docs/projection.md's summary table is regenerated from the command printed above it: a
    change to the model that moves a number must move the doc too (it once lagged by 1-3%)."""
    import re
    import shlex
    from pathlib import Path

    from bench.cli import parser
    text = (Path(__file__).resolve().parents[1] / "docs" / "projection.md").read_text()
    cmd = re.search(r"```\n(rlhf-bench project --model opt-1\.3b,.*?)\n```", text, re.S).group(1)
    argv = shlex.split(cmd.replace("\\\n", " "))[1:] + ["--out", str(tmp_path / "p.csv")]
    args = parser().parse_args(argv)
    assert args.func(args) == 0
    capsys.readouterr()
    df = pd.read_csv(tmp_path / "p.csv", dtype={"chosen": str}).fillna({"chosen": ""})
    want = []
    for (model, gpus), g in df.groupby(["model", "gpus"], sort=False):   # * the search chose
        cells = ["does not fit" if not r.fits else
                 f"{r.total_hours:.3g} h ({r.dominant_phase})" + "*" * bool(r.chosen)
                 for r in (g[g.engine == e].iloc[0] for e in ("hf", "ds-hybrid", "hybrid"))]
        want.append(f"| {model} | {gpus} | " + " | ".join(cells) + " |")
    table = text.split(cmd, 1)[1]
    got = [ln for ln in table.split("\n\n", 2)[1].splitlines() if ln.startswith("| opt-")]
    assert got == want


def test_readme_llama_projection_is_what_its_command_prints(tmp_path, capsys):
    """docs/projection.md's sentence on llama-3-8b quotes its command's hours, in engine order."""
    import re
    from pathlib import Path
    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "projection.md").read_text()
                    .split())
    m = re.search(r"`rlhf-bench project (--model llama-3-8b [^`]*)` gives ([\d.]+), ([\d.]+) and "
                  r"([\d.]+) h on 8 H100s .*? and ([\d.]+), ([\d.]+) and ([\d.]+) h on 64", text)
    argv = m.group(1).split() + ["--out", str(tmp_path / "p.csv")]
    flags = dict(zip([a[2:].replace("-", "_") for a in argv[::2]], argv[1::2]))
    assert run_projection(_args(**flags)) == 0
    capsys.readouterr()
    df = pd.read_csv(tmp_path / "p.csv")
    got = [f"{h:.2f}" for gpus in (8, 64) for h in df[df.gpus == gpus].total_hours]
    assert got == list(m.groups()[1:])


def test_docs_generated_parts_are_what_their_commands_print():
    """docs/projection.md is rebuilt by `python -m bench.projection.docs`; every part but the
    date stamp must be what its command prints now."""
    from bench.projection.docs import DOC, RENDER, regenerate
    text = DOC.read_text(encoding="utf-8")
    assert regenerate(text, tuple(k for k in RENDER if k != "stamp")) == text
    assert "<!-- generated: stamp -->" in text and "<!-- generated: published -->" in text
