"""How far two correct generation paths disagree in a low-precision dtype: hf's own cached
`generate` and `hybrid`'s cached decode, each against hf's full-sequence scoring of the same
greedy tokens. The floor the harness's parity tolerance must clear (parity.parity_tolerance).

Only the actor is built (build_bundle(actor_only=True), no optimiser state), so opt-1.3b fits
here.
Run: python -m bench.micro.logit_floor [PRESET B P G [DTYPE]] (default opt-125m 4 32 32 bfloat16;
numbers in docs/performance.md, "Parity in low precision")."""
import sys
import time

import torch

from bench.parity import dtype_spacing, parity_tolerance
from core import ppo as P
from core.data import synthetic_prompts
from core.models import build_bundle
from core.types import GenerationConfig, Rollout, RunConfig, torch_dtype
from core.models import answer_logits
from engines.hybrid import HybridEngine


def main(preset="opt-125m", B="4", Pl="32", G="32", dtype="bfloat16"):
    B, Pl, G, dt = int(B), int(Pl), int(G), torch_dtype(dtype)
    torch.set_num_threads(2)
    bundle = build_bundle(preset, seed=0, dtype=dt, actor_only=True)
    model, pad = bundle.actor, bundle.pad_id
    pr = synthetic_prompts(B, Pl, bundle.config.vocab_size, pad, seed=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=pr.input_ids, attention_mask=pr.attention_mask,
                             do_sample=False, max_new_tokens=G, min_new_tokens=G, pad_token_id=pad,
                             output_logits=True, return_dict_in_generate=True)
        ans = out.sequences[:, Pl:]
        hf_gen = torch.stack([lg.float().log_softmax(-1).gather(-1, ans[:, i:i + 1])[:, 0]
                              for i, lg in enumerate(out.logits)], 1)
        am = torch.cat([pr.attention_mask, torch.ones_like(ans)], 1)
        logits = answer_logits(model, out.sequences, am, Pl)
        score = P.logprobs_from_logits(logits, ans)
        scale = float(logits.amax(-1).float().abs().max())
        del logits
    # hybrid's own generation path fed these tokens, as the harness's parity probe runs it
    cfg = RunConfig(preset=preset, batch=B, prompt_len=Pl, gen=GenerationConfig(gen_len=G),
                    dtype=dtype, train=False)
    hybrid = HybridEngine()
    hy = hybrid.answer_logprobs(hybrid.init(bundle, cfg, seed=0),
                                Rollout(out.sequences, am, torch.ones_like(ans, dtype=torch.bool),
                                        Pl))
    spacing = dtype_spacing(dtype, scale)
    print(f"{preset} {dtype} batch {B}, {Pl}+{G} tokens ({time.perf_counter() - t0:.0f} s): "
          f"largest |top logit| {scale:.2f}, {dtype} spacing there {spacing:.4g}, "
          f"harness tolerance {parity_tolerance(dtype, scale):.4g}")
    for name, a, b in (("hf generate vs hf scoring", hf_gen, score),
                       ("hybrid decode vs hf scoring", hy, score),
                       ("hybrid decode vs hf generate", hy, hf_gen)):
        d = (a - b).abs()
        print(f"  {name + ':':30s} max {d.max():.4f} ({d.max() / spacing:.2f} spacings), "
              f"mean {d.mean():.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
