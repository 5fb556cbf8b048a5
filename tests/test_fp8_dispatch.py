"""The fp8 GEMM dispatch table (mova_rt/fp8/dispatch.py): built from bench --ops results, read per
(N, K) and GPU, and applied by quantize.apply(gemm="auto") without breaking the fused blocks."""
import json

import pytest
import torch
import torch.nn as nn

from mova_rt.fp8 import dispatch as fp8_dispatch
from mova_rt.fp8 import quantize

H100 = "NVIDIA H100 80GB HBM3"


def _result(device_type="cuda", rows=None, name=H100):
    def row(op, m, k, n, backend, ms):
        return {"op": op, "backend": backend, "status": "ok", "median_ms": ms,
                "shape": f"[{m}, {k}] x [{k}, {n}] + bias bf16"}
    if rows is None:
        rows = [row("linear.video_qkvo", 4000, 64, 64, "torch", 1.0),
                row("linear.video_qkvo", 4000, 64, 64, "fp8-triton", 0.5),
                row("linear.video_qkvo", 4000, 64, 64, "fp8-scaled_mm", 0.6),
                row("linear.video_ffn_up", 4000, 64, 160, "fp8-triton", 0.9),
                row("linear.video_ffn_up", 4000, 64, 160, "fp8-scaled_mm", 0.7),
                row("linear.video_ffn_down", 4000, 160, 64, "fp8-triton", 0.7),
                row("linear.video_ffn_down", 4000, 160, 64, "fp8-scaled_mm", 0.7),  # a tie
                row("linear.text_kv", 512, 64, 64, "fp8-triton", 0.1)]     # one backend only
    return {"environment": {"device_type": device_type, "device_name": name, "commit": "abc"},
            "ops": rows}


@pytest.fixture
def table(tmp_path, monkeypatch):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_result()))
    out = tmp_path / "data" / "fp8_dispatch.json"
    assert fp8_dispatch.main([str(src), "--out", str(out)]) == 0
    monkeypatch.setattr(fp8_dispatch, "TABLE", str(out))
    return out


def test_build_picks_the_faster_backend_per_shape(table):
    t = json.loads(table.read_text())
    assert t["format"] == fp8_dispatch.FORMAT and t["sources"][0]["commit"] == "abc"
    picks = {(e["n"], e["k"]): e["pick"] for e in t["entries"]}
    # (64, 64) triton faster; (160, 64) cuBLASLt faster; (64, 160) a tie -> triton; text_kv
    # has one backend and is left out
    assert picks == {(64, 64): "triton", (160, 64): "scaled_mm", (64, 160): "triton"}
    assert fp8_dispatch.pick(160, 64, H100) == "scaled_mm"
    assert fp8_dispatch.pick(160, 64, "NVIDIA L4") == fp8_dispatch.DEFAULT    # another GPU
    assert fp8_dispatch.pick(999, 64, H100) == fp8_dispatch.DEFAULT           # unmeasured shape
    assert fp8_dispatch.coverage([(64, 64), (160, 64), (7, 7), (64, 64)], H100) == (2, 3)


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


def test_auto_follows_the_table_and_fuses_only_all_triton_blocks(table, monkeypatch):
    """A table that sends the FFN-up shape to cuBLASLt: that layer runs _scaled_mm, so its FFN
    and its block stay unfused; everything else takes the Triton GEMMs."""
    pytest.importorskip("triton")
    from mova_rt.fp8 import block as fp8_block
    from mova_rt.models.video_dit import DiTBlock
    from mova_rt.ops import resolve

    monkeypatch.setattr(fp8_dispatch, "device_name", lambda device: H100)
    tower = nn.Module()
    tower.blocks = nn.ModuleList([DiTBlock(64, 2, 160, 1e-6, resolve("triton"))])
    tower = tower.to(torch.bfloat16)
    quantize.apply({"audio_dit": tower}, gemm="auto")
    block = tower.blocks[0]
    assert block.ffn[0].gemm_name == "scaled_mm" and block.ffn[2].gemm_name == "triton"
    assert block.self_attn.q.gemm_name == "triton"
    assert isinstance(block.ffn, nn.Sequential) and type(block) is DiTBlock
    assert not fp8_block.fusable(block)
