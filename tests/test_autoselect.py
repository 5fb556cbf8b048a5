"""`--kernels auto` (mova_rt/autoselect.py): chosen per op kind from committed GPU measurements,
the reference's backend where nothing is measured (and on every CPU), a kernel of ours only when
it beats the library op; and every backend auto can choose keeps the reference's bf16 fidelity
on the same weights (within 1.5x of its distance to fp32), fused q/k/v projections included."""
import copy
import json
import os

import pytest
import torch

from mova_rt import autoselect
from mova_rt.ops import resolve

H200_OPS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                        "2026-11-30_nvidia-h200_mova-360p_ops.json")
EVERY_ALTERNATIVE = {"attention": "sdpa-priority", "norm_rope": "triton",
                     "norm_modulate": "triton", "gated_residual": "triton",
                     "layernorm_affine": "triton", "residual_layernorm_affine": "triton",
                     "qkv": "fused"}


def test_cpu_and_unmeasured_gpus_keep_the_reference_backends():
    assert autoselect.choose(None) == autoselect.REFERENCE
    assert autoselect.choose("cpu") == autoselect.REFERENCE
    ops = resolve("auto", device="cpu")
    assert ops.choices["norm_rope"] == "float64" and ops.choices["attention"] == "sdpa"
    got = autoselect.decisions(gpu=("NVIDIA A100-SXM4-80GB", "sm_80"))
    assert {k: v[0] for k, v in got.items()} == autoselect.REFERENCE
    assert all("nothing measured" in why for _, why in got.values())


def test_the_committed_h200_run_decides_on_hopper(tmp_path):
    """The table committed in mova_rt/data is the one the H200 results build; the H200 takes its
    own entries, an H100 (same sm_90) the H200's, with the measured reasons."""
    with open(H200_OPS, encoding="utf-8") as fh:
        built = autoselect.build([(H200_OPS, json.load(fh))])
    with open(autoselect.TABLE, encoding="utf-8") as fh:
        assert json.load(fh)["entries"] == built["entries"]
    want = {"attention": "sdpa-priority",       # a tie with SDPA's own pick: the explicit one
            "norm_rope": "float32",             # RoPE 4.09 vs 7.26 ms
            "norm_modulate": "triton", "gated_residual": "triton",       # 0.51 vs 2.50, 0.38 vs 0.83
            "layernorm_affine": "eager",        # Triton 0.47 ms is slower than eager 0.32
            "residual_layernorm_affine": "triton",
            "qkv": "separate"}                  # not measured yet: the reference's projections
    for gpu in (("NVIDIA H200", "sm_90"), ("NVIDIA H100 80GB HBM3", "sm_90")):
        got = autoselect.decisions(gpu=gpu)
        assert {k: v[0] for k, v in got.items()} == want, gpu
        assert "measured on NVIDIA H200" in got["norm_modulate"][1]


def test_ours_must_beat_the_library_and_the_explicit_sdpa_wins_ties():
    assert autoselect.pick({"eager": 1.0, "triton": 0.5}) == "triton"
    assert autoselect.pick({"eager": 1.0, "triton": 0.99}) == "eager"      # inside the margin
    assert autoselect.pick({"float64": 7.0, "float32": 4.0, "triton": 3.95}) == "float32"
    assert autoselect.pick({"sdpa": 10.0, "sdpa-priority": 10.2}) == "sdpa-priority"
    assert autoselect.pick({"sdpa": 10.0, "sdpa-priority": 12.0}) == "sdpa"


def test_the_table_builder_refuses_what_is_not_a_gpu_ops_run(tmp_path, capsys):
    with open(H200_OPS, encoding="utf-8") as fh:
        good = json.load(fh)
    cases = {"cpu": {**good, "environment": {"device_type": "cpu"}},
             "tiny": {**good, "preset": "tiny"}, "empty": {**good, "ops": []}}
    for name, data in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        assert autoselect.main([str(path), "--out", str(tmp_path / "t.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.json").exists()


def test_every_choice_of_auto_keeps_the_reference_bf16_fidelity(monkeypatch):
    """One joint forward of the tiny model (random bf16 weights) with every alternative auto can
    pick (the Triton kernels through the interpreter, SDPA with explicit backends, q/k/v as one
    GEMM sharing the weights): no further from the fp32 result than 1.5x the reference path."""
    from mova_rt.benchmarks.bench_step import build_shared_weights, make_inputs
    from mova_rt.benchmarks.configs import eager_runner
    from mova_rt.benchmarks.flops import clip_shapes
    from mova_rt.config import PRESET_SIZES, preset_config
    from mova_rt.fuse import FusedSelfAttention
    from mova_rt.scheduler import FlowMatchScheduler

    cfg = preset_config("tiny")
    s = clip_shapes(cfg, *PRESET_SIZES["tiny"])
    shared = build_shared_weights(cfg, torch.device("cpu"), None, seed=3)
    fp32 = {k: copy.deepcopy(m).float() for k, m in shared.items()}
    inp = make_inputs(cfg, s, torch.device("cpu"), seed=3)
    sched = FlowMatchScheduler(cfg.scheduler, 50)
    x = torch.cat([inp["latents"], inp["condition"]], 1)
    t = torch.tensor([900.0])

    def forward(kernels, weights=shared, text=inp["pos"]):
        r = eager_runner(kernels)(weights, cfg, sched, 5.0, 24.0)
        out = r.step.forward(r.video_dit, x, inp["audio"], text, t, 24.0)
        return r, [o.float() for o in out]

    _, truth = forward("reference", fp32, inp["pos"].float())
    _, ref = forward("reference")
    monkeypatch.setattr(autoselect, "choose", lambda device=None, path=None: EVERY_ALTERNATIVE)
    runner, auto = forward("auto")
    assert runner.video_dit.blocks[0].self_attn.__class__ is FusedSelfAttention
    # one copy of the weights: the shared modules hold the fused views too
    assert shared["video_dit"].blocks[0].self_attn.k.weight.data_ptr() == \
        runner.video_dit.blocks[0].self_attn.k.weight.data_ptr()
    for name, a, r, f in zip(("video", "audio"), auto, ref, truth):
        e_auto, e_ref = (a - f).norm() / f.norm(), (r - f).norm() / f.norm()
        print(f"{name}: auto {e_auto:.2e}, reference {e_ref:.2e} from fp32")
        assert e_auto <= 1.5 * e_ref + 1e-6
