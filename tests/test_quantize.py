"""fp8 weights (mova_rt/fp8/): the numerics, which layers, the files and their checks, and
the per-forward error of the fp8 path against bf16 on the tiny model."""
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

from mova_rt import fp8 as fp8_pkg
from mova_rt.fp8 import quantize
from mova_rt.quantize_cmd import quantize_checkpoint
from mova_rt.errors import MovaInputError
from mova_rt.pipeline import MovaPipeline

E4M3_REL = 2.0 ** -4          # half an ulp of e4m3's 3-bit mantissa, relative


def _rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


@pytest.mark.parametrize("shape", [(403, 96), (7, 1, 33), (1, 5)])
def test_quantize_rows_round_trip(shape):
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 50
    q, s = quantize.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == shape[:-1]
    assert q.float().abs().max() <= 448
    back = q.float() * s[..., None]
    amax = x.abs().amax(-1, keepdim=True)
    # normal e4m3 values round to half an ulp; the smallest ones to e4m3's subnormal step
    assert ((back - x).abs() <= E4M3_REL * x.abs() + 2.0 ** -9 * s[..., None] + 1e-12).all()
    assert torch.allclose(q.float().abs().amax(-1), torch.full(shape[:-1], 448.0))
    assert (amax > 0).all()


def test_zero_row_keeps_scale_one():
    q, s = quantize.quantize_rows(torch.zeros(3, 8))
    assert torch.equal(s, torch.ones(3)) and (q.float() == 0).all()


@pytest.mark.parametrize("m, k, n", [(403, 96, 80), (1, 64, 13), (45, 128, 200)])
def test_scaled_mm_gemm_matches_reference(m, k, n):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    xq, xs = quantize.quantize_rows(x)
    wq, ws = quantize.quantize_rows(w)
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = quantize.fp8_linear_ref(xq, xs, wq, ws, b, out_dtype)
        got = quantize.fp8_linear_scaled_mm(xq, xs, wq, ws, b, out_dtype)
        tol = 1e-5 if out_dtype == torch.float32 else 2 ** -8
        assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_fp8_linear_against_bf16_linear():
    """One layer's error against the bf16 Linear stays near e4m3's own (two roundings)."""
    lin = nn.Linear(256, 192).bfloat16()
    x = torch.randn(4, 403, 256).bfloat16()
    wq, ws = quantize.quantize_rows(lin.weight.detach())
    fp8 = quantize.Fp8Linear(wq, ws, lin.bias.detach())
    ref = lin(x)
    got = fp8(x)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert _rel(got, ref) < 2 * E4M3_REL


def test_which_layers(tiny_ckpt):
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8")
    dit = pipe.video_dit
    kinds = {type(m).__name__ for m in dit.blocks[0].modules() if isinstance(
        m, (nn.Linear, quantize.Fp8Linear))}
    assert kinds == {"Linear", "Fp8Linear"}
    block = dit.blocks[0]
    for name in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                 "cross_attn.o", "ffn.0", "ffn.2"):
        assert isinstance(block.get_submodule(name), quantize.Fp8Linear), name
    for name in ("cross_attn.k", "cross_attn.v"):          # once per request: kept
        assert type(block.get_submodule(name)) is nn.Linear, name
    for m in (dit.head.head, dit.text_embedding[0], dit.time_embedding[0], dit.time_projection[1]):
        assert type(m) is nn.Linear
    # the dispatch keeps the GEMMs over audio rows in bf16 (2-3x faster there on an H200): the
    # bridge's a2v k/v and v2a q/o, and the audio DiT
    a2v = pipe.bridge.audio_to_video_conditioners["0"].inner
    v2a = pipe.bridge.video_to_audio_conditioners["0"].inner
    assert all(isinstance(getattr(a2v, n), quantize.Fp8Linear) for n in "qo")
    assert all(isinstance(getattr(v2a, n), quantize.Fp8Linear) for n in "kv")
    assert all(type(getattr(m, n)) is nn.Linear for m, names in ((a2v, "kv"), (v2a, "qo"))
               for n in names)
    assert not any(isinstance(m, quantize.Fp8Linear) for m in pipe.audio_dit.modules())
    n_video = sum(isinstance(m, quantize.Fp8Linear) for m in dit.modules())
    assert n_video == 8 * len(dit.blocks)
    bf16 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    assert len(quantize.quantizable("video_dit", bf16.video_dit)) == n_video


def test_fp8_forward_error_per_tower(tiny_ckpt):
    """Per-forward relative error of the fp8 path against bf16 on the tiny model, per tower:
    measured 3.5% (video) and 3.0% (audio); held under 6%. (The tiny model's K of 64-128 gives
    the per-token scales little to average over; the issue's 3% target is for the full model,
    measured on a GPU.)"""
    g = torch.Generator().manual_seed(0)
    v, a, text = (torch.randn(2, 36, 5, 8, 12, generator=g), torch.randn(2, 16, 36, generator=g),
                  torch.randn(2, 512, 32, generator=g))
    t = torch.tensor([700.0])
    bf16 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    fp8 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8")
    ref = bf16._forward(bf16.video_dit, v, a, text, t, 24.0)
    got = fp8._forward(fp8.video_dit, v, a, text, t, 24.0)
    errs = [_rel(x, y) for x, y in zip(got, ref)]
    print(f"fp8 vs bf16 per forward: video {errs[0]:.4f}, audio {errs[1]:.4f}")
    assert all(0 < e < 0.06 for e in errs)


CLIP = dict(height=64, width=96, num_frames=17, num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def fp8_dir(tiny_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fp8") / "q")
    quantize_checkpoint(tiny_ckpt, out)
    return out


def test_saved_weights_give_the_same_latents_as_quantizing_on_load(tiny_ckpt, fp8_dir):
    on_load = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8")
    saved = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8",
                                         fp8_weights=fp8_dir)
    a = on_load("x", None, **CLIP)
    b = saved("x", None, **CLIP)
    assert torch.equal(a.video_latents, b.video_latents)
    assert torch.equal(a.audio_latents, b.audio_latents)
    manifest = json.load(open(os.path.join(fp8_dir, "manifest.json")))
    assert manifest["scheme"] == quantize.SCHEME and set(manifest["components"]) == set(
        quantize.COMPONENTS)


def test_offload_streams_fp8_weights_bit_identically(tiny_ckpt, fp8_dir):
    plain = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8",
                                         fp8_weights=fp8_dir)
    group = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8",
                                         fp8_weights=fp8_dir, offload="group")
    a, b = plain("x", None, **CLIP), group("x", None, **CLIP)
    assert torch.equal(a.video_latents, b.video_latents) and group.streamer.loads > 0


def _damage(src, tmp_path, how):
    dst = tmp_path / "q"
    shutil.copytree(src, dst)
    if how == "no_manifest":
        os.remove(dst / "manifest.json")
    elif how == "truncated":
        f = dst / "video_dit.fp8.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif how == "missing_component":
        m = json.load(open(dst / "manifest.json"))
        del m["components"]["audio_dit"]
        json.dump(m, open(dst / "manifest.json", "w"))
    elif how == "other_scheme":
        m = json.load(open(dst / "manifest.json"))
        m["scheme"] = "int8/tensor"
        json.dump(m, open(dst / "manifest.json", "w"))
    return str(dst)


@pytest.mark.parametrize("how, words", [
    ("no_manifest", "has no manifest.json"),
    ("truncated", "is damaged or incomplete"),
    ("missing_component", "lacks ['audio_dit']"),
    ("other_scheme", "this mova-rt reads"),
])
def test_damaged_fp8_weights_are_refused(tiny_ckpt, fp8_dir, tmp_path, how, words):
    bad = _damage(fp8_dir, tmp_path, how)
    with pytest.raises(MovaInputError, match=f".*{words.replace('[', '.').replace(']', '.')}"
                                             ".*mova-rt quantize"):
        MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8", fp8_weights=bad)


def test_fp8_weights_of_another_checkpoint_are_refused(tmp_path, fp8_dir):
    from mova_rt.checkpoint import make_checkpoint
    other = str(tmp_path / "seed1")
    make_checkpoint("tiny", other, seed=1)
    with pytest.raises(MovaInputError, match="quantized from another checkpoint"):
        MovaPipeline.from_pretrained(other, dtype="bf16", precision="fp8", fp8_weights=fp8_dir)


@pytest.mark.parametrize("kw, words", [
    ({"fp8_weights": "x"}, "pass --precision fp8"),
    ({"precision": "fp8", "dtype": "fp32"}, "use --dtype bf16"),
    ({"precision": "fp8", "offload": "group", "stream_from_disk": True}, "without it"),
    ({"precision": "int4"}, "--precision int4 is not supported"),
])
def test_bad_precision_combinations(tiny_ckpt, kw, words):
    kw = {"dtype": "bf16", **kw}
    with pytest.raises(MovaInputError, match=words):
        MovaPipeline.from_pretrained(tiny_ckpt, **kw)


def test_quantize_command_and_generate_flag(tmp_path, tiny_ckpt):
    from mova_rt.cli import main
    out = str(tmp_path / "q")
    assert main(["quantize", "--ckpt_path", tiny_ckpt, "--out", out]) == 0
    assert main(["quantize", "--ckpt_path", tiny_ckpt, "--out", out]) == 2     # exists
    assert main(["generate", "--ckpt_path", tiny_ckpt, "--prompt", "x", "--height", "64",
                 "--width", "96", "--num_frames", "17", "--num_inference_steps", "2",
                 "--precision", "fp8", "--fp8_weights", out, "--no-progress",
                 "--output_path", str(tmp_path / "clip.mp4")]) == 0
    assert os.path.getsize(tmp_path / "clip.mp4") > 0


@pytest.mark.parametrize("extra, words", [
    (["--prompt", "x"], "--prompt describe calibration inputs: add --calibrate"),
    (["--calib_steps", "4"], "--calib_steps describe calibration inputs"),
    (["--calibrate"], "needs at least one --prompt"),
    (["--calibrate", "--prompt", "x", "--calib_steps", "0"], "--calib_steps 0 must be an integer "
                                                             "of at least 1"),
])
def test_quantize_calibrate_flags_are_checked(tiny_ckpt, tmp_path, capsys, extra, words):
    from mova_rt.cli import main
    out = tmp_path / "q"
    assert main(["quantize", "--ckpt_path", tiny_ckpt, "--out", str(out), *extra]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_modelopt_calibration_static_scales_end_to_end(tiny_ckpt, tmp_path):
    """quantize.calibrate (nvidia-modelopt, max calibration) on a throwaway bf16 pipeline over
    forwards of both experts: one static input scale per quantized layer; the fp8 model with
    them stays within the error bound (static scales: coarser than per token); saved and loaded
    back, they give the same forward bit for bit."""
    pytest.importorskip("modelopt.torch.quantization")
    g = torch.Generator().manual_seed(0)
    v, a, text = (torch.randn(2, 36, 5, 8, 12, generator=g), torch.randn(2, 16, 36, generator=g),
                  torch.randn(2, 512, 32, generator=g))
    calib = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    towers = {"video_dit": calib.video_dit, "video_dit_2": calib.video_dit_2,
              "audio_dit": calib.audio_dit, "dual_tower_bridge": calib.bridge}

    def loop():
        for dit, t in ((calib.video_dit, 900.0), (calib.video_dit_2, 300.0)):
            calib._forward(dit, v, a, text, torch.tensor([t]), 24.0)
    scales = fp8_pkg.calibrate(towers, loop)
    bf16 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    for c, module in (("video_dit", bf16.video_dit), ("dual_tower_bridge", bf16.bridge)):
        assert set(scales[c]) == set(quantize.quantizable(c, module))
    assert all(float(s) > 0 for layers in scales.values() for s in layers.values())

    fp8 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    modules = {"video_dit": fp8.video_dit, "video_dit_2": fp8.video_dit_2,
               "audio_dit": fp8.audio_dit, "dual_tower_bridge": fp8.bridge}
    used = quantize.apply(modules, input_scales=scales)
    assert fp8.video_dit.blocks[0].self_attn.q.input_scale is not None
    t = torch.tensor([700.0])
    got = fp8._forward(fp8.video_dit, v, a, text, t, 24.0)
    ref = bf16._forward(bf16.video_dit, v, a, text, t, 24.0)
    errs = [_rel(x, y) for x, y in zip(got, ref)]
    print(f"fp8 with static calibrated input scales vs bf16: video {errs[0]:.4f}, "
          f"audio {errs[1]:.4f}")
    assert all(0 < e < 0.08 for e in errs)

    out = str(tmp_path / "static")
    fp8_pkg.save(used, tiny_ckpt, out)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["components"]["audio_dit"]["activations"] == "static-tensor"
    again = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8",
                                         fp8_weights=out)
    assert again.video_dit.blocks[1].ffn[0].input_scale is not None
    # loaded, the layers the dispatch keeps in bf16 (audio rows) read the checkpoint instead
    want = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    quantize.apply({"video_dit": want.video_dit, "video_dit_2": want.video_dit_2,
                    "audio_dit": want.audio_dit, "dual_tower_bridge": want.bridge},
                   fp8_pkg.load(out, tiny_ckpt), gemm="auto")
    for x, y in zip(again._forward(again.video_dit, v, a, text, t, 24.0),
                    want._forward(want.video_dit, v, a, text, t, 24.0)):
        assert torch.equal(x, y)


def test_producer_fp8_path_holds_the_error_bound(tiny_ckpt):
    """--kernels triton --precision fp8: the DiT blocks fused (the adaLN / norm3 Triton kernels
    write e4m3 + per-token scales read by the _scaled_mm GEMMs; interpreter here); per-forward
    error against bf16 as the unfused cuBLAS path (measured 3.5% / 3.0%)."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    v, a, text = (torch.randn(2, 36, 5, 8, 12, generator=g), torch.randn(2, 16, 36, generator=g),
                  torch.randn(2, 512, 32, generator=g))
    t = torch.tensor([700.0])
    fp8 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8", kernels="triton")
    from mova_rt.fp8.block import Fp8DiTBlock      # producers quantize
    # on a CPU the dispatch defaults keep the audio rows in bf16: video blocks fused, audio not
    assert all(type(b) is Fp8DiTBlock for b in fp8.video_dit.blocks)
    assert not any(type(b) is Fp8DiTBlock for b in fp8.audio_dit.blocks)
    assert isinstance(fp8.audio_dit.blocks[0].self_attn.q, nn.Linear)
    bf16 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    got = fp8._forward(fp8.video_dit, v, a, text, t, 24.0)
    ref = bf16._forward(bf16.video_dit, v, a, text, t, 24.0)
    errs = [_rel(x, y) for x, y in zip(got, ref)]
    print(f"producer fp8 vs bf16 per forward: video {errs[0]:.4f}, audio {errs[1]:.4f}")
    assert all(0 < e < 0.06 for e in errs)


def test_fused_fp8_block_equals_the_unfused_fp8_block():
    """mova_rt/fp8/block.py: the norms writing e4m3 + per-token scales for the GEMMs give the
    same block output as Fp8Linear after the bf16 norm kernels, on the same weights: batch 2 with
    a shared (batch-1) modulation, 37 tokens."""
    pytest.importorskip("triton")
    from mova_rt.fp8 import block as fp8_block
    from mova_rt.models.video_dit import DiTBlock
    from mova_rt.ops import resolve
    from mova_rt.rope import InterleavedRope

    torch.manual_seed(0)
    ops = resolve("triton")
    dim, heads, ffn, length = 64, 2, 160, 37
    tower = nn.Module()
    tower.blocks = nn.ModuleList([DiTBlock(dim, heads, ffn, 1e-6, ops)])
    for p in tower.parameters():
        nn.init.normal_(p, std=0.2)
    tower = tower.to(torch.bfloat16)
    quantize.apply({"audio_dit": tower}, gemm="scaled_mm", producers=True)
    block = tower.blocks[0]
    assert type(block) is fp8_block.Fp8DiTBlock
    x = torch.randn(2, length, dim).to(torch.bfloat16)
    text_kv = block.cross_attn.kv(torch.randn(2, 512, dim).to(torch.bfloat16))
    t_mod = (0.3 * torch.randn(1, 6, dim)).to(torch.bfloat16)
    rope = InterleavedRope.audio(dim // heads, length, "cpu")
    fused = block(x, text_kv, t_mod, rope)
    block.__class__ = DiTBlock
    unfused = block(x, text_kv, t_mod, rope)
    assert fused.dtype == torch.bfloat16 and fused.shape == x.shape
    assert torch.isfinite(fused).all() and not torch.equal(fused, x)
    # the same numerics by construction; allow a last-bit flip where two fp32 sums differ
    diff = (fused != unfused).float().mean().item()
    print(f"fused vs unfused fp8 block: {diff:.2e} of elements differ, rel {_rel(fused, unfused):.2e}")
    assert diff <= 1e-3 and _rel(fused, unfused) < 1e-3


def test_fp8_weights_replace_the_bf16_weights_unread(tiny_ckpt, fp8_dir, monkeypatch):
    """With --fp8_weights the bf16 weights of the layers that run in e4m3 are never read (they
    stay deferred on the meta device until the fp8 layers replace them), so they never reach a
    GPU; their biases and every other tensor are read as usual."""
    from mova_rt import loader
    seen = set()
    real = loader._read_all

    def spy(files, component, *args, **kwargs):
        seen.update((component, key) for key in files)
        return real(files, component, *args, **kwargs)
    monkeypatch.setattr(loader, "_read_all", spy)
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8",
                                        fp8_weights=fp8_dir)
    quantized = {(c, f"{name}.weight") for c, layers in pipe.fp8_weights.items() for name in layers}
    assert len(quantized) > 8 and not quantized & seen
    assert ("video_dit", "blocks.0.self_attn.q.bias") in seen
    assert not any(p.is_meta for m in (pipe.video_dit, pipe.bridge) for p in m.parameters())


def test_one_quantization_feeds_every_gemm_that_reads_an_input(tiny_ckpt, monkeypatch):
    """Outside fused blocks, the fp8 q/k/v GEMMs and the bridge's fp8 k/v GEMMs read one
    per-token quantization of their input (counted), with the same values as each layer
    quantizing it itself."""
    from mova_rt.fp8 import block as fp8_block
    from mova_rt.models.bridge import ConditionalCrossAttention
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8",
                                        kernels="reference")
    v2a = pipe.bridge.video_to_audio_conditioners[str(pipe.bridge.layers[0])].inner
    sa = pipe.video_dit.blocks[0].self_attn
    assert type(v2a) is fp8_block.Fp8SharedCrossAttention
    assert type(sa) is fp8_block.Fp8SharedSelfAttention
    calls = []
    real = fp8_block.quantize_activations
    monkeypatch.setattr(fp8_block, "quantize_activations", lambda x: calls.append(x) or real(x))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 36, v2a.q.in_features, generator=g).to(torch.bfloat16)
    y = torch.randn(1, 120, v2a.k.in_features, generator=g).to(torch.bfloat16)
    shared = v2a(x, y)
    assert len(calls) == 1 and calls[0].shape == (120, v2a.k.in_features)    # y, once
    v2a.__class__ = ConditionalCrossAttention                    # each layer quantizes y itself
    assert torch.equal(v2a(x, y), shared)
