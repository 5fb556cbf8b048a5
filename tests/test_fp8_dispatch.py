"""The fp8 GEMM dispatch table (mova_rt/fp8/dispatch.py): built from bench --ops results, read per
(N, K, kind of rows) and GPU, and applied by fp8.apply(gemm="auto"): the layers it keeps in bf16
stay nn.Linear, and blocks are fused only when all their GEMMs are fp8."""
import json
import os

import pytest
import torch
import torch.nn as nn

from mova_rt.fp8 import dispatch as fp8_dispatch
from mova_rt.fp8 import quantize

H100 = ("NVIDIA H100 80GB HBM3", "sm_90")
H200_OPS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                        "2026-11-30_nvidia-h200_mova-360p_ops.json")


def _result(device_type="cuda", rows=None, name=H100[0]):
    def row(op, m, k, n, backend, ms):
        return {"op": op, "backend": backend, "status": "ok", "median_ms": ms,
                "shape": f"[{m}, {k}] x [{k}, {n}] + bias bf16"}
    if rows is None:
        rows = [row("linear.video_qkvo", 4096, 64, 64, "torch", 1.0),
                row("linear.video_qkvo", 4096, 64, 64, "fp8-scaled_mm", 0.6),
                row("linear.video_ffn_up", 4096, 64, 160, "torch", 0.7),
                row("linear.video_ffn_up", 4096, 64, 160, "fp8-scaled_mm", 0.9),
                row("linear.audio_qkvo", 403, 64, 64, "torch", 0.1),
                row("linear.audio_qkvo", 403, 64, 64, "fp8-scaled_mm", 0.05),
                row("linear.text_kv", 512, 64, 160, "torch", 0.1)]     # one backend only
    return {"environment": {"device_type": device_type, "device_name": name, "sm": "sm_90",
                            "commit": "abc"}, "ops": rows}


@pytest.fixture
def table(tmp_path, monkeypatch):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_result()))
    out = tmp_path / "data" / "fp8_dispatch.json"
    assert fp8_dispatch.main([str(src), "--out", str(out)]) == 0
    monkeypatch.setattr(fp8_dispatch, "TABLE", str(out))
    fp8_dispatch._entries.cache_clear()
    yield out
    fp8_dispatch._entries.cache_clear()


def test_build_picks_the_faster_backend_per_shape_and_rows(table):
    t = json.loads(table.read_text())
    assert t["format"] == fp8_dispatch.FORMAT and t["sources"][0]["commit"] == "abc"
    picks = {(e["n"], e["k"], e["rows"]): e["pick"] for e in t["entries"]}
    assert picks == {(64, 64, "video"): "scaled_mm", (160, 64, "video"): "bf16",
                     (64, 64, "audio"): "scaled_mm"}           # text_kv: one backend, left out
    assert fp8_dispatch.pick(160, 64, "video", H100) == "bf16"
    assert fp8_dispatch.pick(64, 64, "audio", H100) == "scaled_mm"
    # the same capability takes the measurement; another, or no GPU, the defaults
    assert fp8_dispatch.pick(160, 64, "video", ("NVIDIA H200", "sm_90")) == "bf16"
    assert fp8_dispatch.pick(160, 64, "video", ("NVIDIA L4", "sm_89")) == "scaled_mm"
    assert fp8_dispatch.pick(999, 64, "audio", H100) == "bf16"
    assert fp8_dispatch.pick(999, 64, "video", None) == "scaled_mm"


def test_build_refuses_runs_without_gpu_fp8_rows(tmp_path, capsys):
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps(_result(device_type="cpu")))
    assert fp8_dispatch.main([str(cpu), "--out", str(tmp_path / "t.json")]) == 2
    assert "not a GPU" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(_result(rows=[])))
    assert fp8_dispatch.main([str(empty), "--out", str(tmp_path / "t.json")]) == 2
    assert "no linear.* rows" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_the_committed_table_is_the_h200_run():
    """mova_rt/data/fp8_dispatch.json is built from the committed H200 results: e4m3 on the
    video-row GEMMs, bf16 on every 403-row one (2-3x faster there)."""
    with open(H200_OPS, encoding="utf-8") as fh:
        built = fp8_dispatch.build([(H200_OPS, json.load(fh))])
    with open(fp8_dispatch.TABLE, encoding="utf-8") as fh:
        assert json.load(fh)["entries"] == built["entries"]
    for e in built["entries"]:
        assert e["pick"] == ("scaled_mm" if e["rows"] == "video" else "bf16"), e


def test_rows_of_every_quantizable_layer():
    assert fp8_dispatch.rows_of("video_dit", "blocks.3.ffn.0") == "video"
    assert fp8_dispatch.rows_of("audio_dit", "blocks.3.self_attn.q") == "audio"
    bridge = "dual_tower_bridge"
    assert fp8_dispatch.rows_of(bridge, "audio_to_video_conditioners.2.inner.q") == "video"
    assert fp8_dispatch.rows_of(bridge, "audio_to_video_conditioners.2.inner.k") == "audio"
    assert fp8_dispatch.rows_of(bridge, "video_to_audio_conditioners.2.inner.o") == "audio"
    assert fp8_dispatch.rows_of(bridge, "video_to_audio_conditioners.2.inner.v") == "video"


def test_auto_follows_the_table_and_fuses_only_all_fp8_blocks(table, monkeypatch):
    """A table that keeps the FFN-up shape in bf16: that layer stays nn.Linear, so its block is
    not fused; everything else runs _scaled_mm."""
    pytest.importorskip("triton")
    from mova_rt.fp8 import block as fp8_block
    from mova_rt.models.video_dit import DiTBlock
    from mova_rt.ops import resolve

    monkeypatch.setattr(fp8_dispatch, "device_name", lambda device: H100)
    tower = nn.Module()
    tower.blocks = nn.ModuleList([DiTBlock(64, 2, 160, 1e-6, resolve("triton"))])
    tower = tower.to(torch.bfloat16)
    quantize.apply({"video_dit": tower}, gemm="auto", device="cpu", producers=True)
    block = tower.blocks[0]
    assert type(block.ffn[0]) is nn.Linear and block.ffn[2].gemm_name == "scaled_mm"
    assert block.self_attn.q.gemm_name == "scaled_mm"
    assert type(block) is DiTBlock and not fp8_block.fusable(block)
