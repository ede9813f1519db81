"""bf16 parameters train through a float32 master copy, so small updates are not lost."""
import torch

from core.optim import adamw, apply_updates_


def test_bf16_params_follow_a_float32_master():
    start = torch.randn(1000).to(torch.bfloat16).float()  # exactly representable in bf16
    p32, pbf = {"w": start.clone()}, {"w": start.to(torch.bfloat16)}
    opt = adamw(1e-5, (0.9, 0.95))
    s32, sbf = opt.init(p32), opt.init(pbf)
    assert s32.master is None and sbf.master["w"].dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = torch.randn(1000, generator=gen)
        u, s32 = opt.update({"w": g}, s32, p32)
        apply_updates_(p32, u)
        u, sbf = opt.update({"w": g.to(torch.bfloat16)}, sbf, pbf)
        apply_updates_(pbf, u)
    # the master moved as float32 training did; 20 steps of 1e-5 are below bf16's resolution
    # near 1, which is exactly what a master copy is for
    assert (sbf.master["w"] - p32["w"]).abs().max() < 1e-6
    assert (p32["w"] - start).abs().max() > 1e-4
    assert torch.equal(pbf["w"], sbf.master["w"].to(torch.bfloat16))
