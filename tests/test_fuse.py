"""mova_rt/fuse.py: q/k/v (and the bridge's k/v) as one GEMM on the concatenated checkpoint
weights: the same parameters under the same names (views of the fused weight, no second copy),
the same forward (fp32: to rounding; bf16: within bf16 rounding), and applied by the pipeline
only where the weights stay resident in bf16."""
import pytest
import torch
import torch.nn as nn

from mova_rt import autoselect
from mova_rt.fuse import FusedCrossAttention, FusedSelfAttention, fuse_projections
from mova_rt.pipeline import MovaPipeline

G = torch.Generator().manual_seed(0)


def _inputs(pipe, dtype):
    v = torch.randn(1, 36, 5, 8, 12, generator=G).to(dtype)
    a = torch.randn(1, 16, 36, generator=G).to(dtype)
    text = torch.randn(1, 512, 32, generator=G).to(dtype)
    return v, a, text, torch.tensor([700.0])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_projections_keep_weights_names_and_results(tiny_ckpt, dtype):
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype=dtype, kernels="reference")
    v, a, text, t = _inputs(pipe, pipe.dtype)
    before = pipe._forward(pipe.video_dit, v, a, text, t, 24.0)
    keys = {k: v_.clone() for k, v_ in pipe.video_dit.state_dict().items()}
    n = fuse_projections(pipe.video_dit, pipe.audio_dit, pipe.bridge)
    blocks = len(pipe.video_dit.blocks) + len(pipe.audio_dit.blocks)
    assert n == blocks + 2 * len(pipe.bridge.layers)
    sa = pipe.video_dit.blocks[0].self_attn
    assert type(sa) is FusedSelfAttention
    assert type(pipe.bridge.video_to_audio_conditioners[str(pipe.bridge.layers[0])].inner) \
        is FusedCrossAttention
    # same names and values, and the q/k/v parameters live inside the fused weight
    after = pipe.video_dit.state_dict()
    assert set(after) == set(keys) and all(torch.equal(after[k], keys[k]) for k in keys)
    assert sa.k.weight.untyped_storage().data_ptr() == sa.qkv_weight.untyped_storage().data_ptr()
    got = pipe._forward(pipe.video_dit, v, a, text, t, 24.0)
    for x, y in zip(got, before):
        rel = ((x.float() - y.float()).norm() / y.float().norm()).item()
        assert rel <= (1e-6 if dtype == "fp32" else 1e-2), rel


def test_only_plain_linear_layers_are_fused():
    from mova_rt.models.video_dit import SelfAttention
    from mova_rt.ops import resolve
    sa = SelfAttention(64, 2, 1e-6, resolve("reference"))
    sa.k = nn.Identity()                  # e.g. a layer another transform replaced
    assert fuse_projections(sa) == 0 and type(sa) is SelfAttention


def test_the_pipeline_fuses_where_auto_chose_it_and_the_weights_stay_resident(tiny_ckpt,
                                                                                 monkeypatch):
    chosen = dict(autoselect.REFERENCE, qkv="fused")
    monkeypatch.setattr(autoselect, "choose", lambda device=None, path=None: chosen)
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    assert type(pipe.video_dit.blocks[0].self_attn) is FusedSelfAttention
    assert type(pipe.video_dit_2.blocks[0].self_attn) is FusedSelfAttention
    for kw in (dict(offload="cpu"), dict(offload="group"), dict(precision="fp8")):
        pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", **kw)
        assert type(pipe.video_dit.blocks[0].self_attn) is not FusedSelfAttention, kw
