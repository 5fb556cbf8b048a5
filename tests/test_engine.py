"""Ahead-of-time engines (mova_rt/engine.py): `mova-rt build` + `generate --engine` on the tiny
model with the inductor backend (AOTInductor compiles C++ on the CPU), the engine's outputs against
the eager path, every refusal (request, checkpoint, precision, kernels, machine, versions, damaged
or partial folders), the ONNX export of the TensorRT backend checked with onnxruntime, and the
TensorRT half itself where the package is installed (never here)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mova_rt import engine as E
from mova_rt.cli import main
from mova_rt.errors import MovaInputError
from mova_rt.pipeline import MovaPipeline

SIZE = dict(height=64, width=96, num_frames=17)
RUN = dict(prompt="a dog barks", num_inference_steps=4, progress=False, decode=False, **SIZE)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm())


@pytest.fixture(scope="module")
def engines(tiny_ckpt, tmp_path_factory):
    """bf16 and fp8 inductor engines of the tiny checkpoint, built once (about 25 s each)."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for precision in ("bf16", "fp8"):
        path = str(root / precision)
        E.build(E.BuildRequest(tiny_ckpt, precision=precision, **SIZE), path, log=lambda m: None)
        out[precision] = path
    return out


def damaged_copy(src: str, dst, edit=None) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    if edit is not None:
        path = os.path.join(dst, E.MANIFEST)
        with open(path) as fh:
            manifest = json.load(fh)
        edit(manifest)
        with open(path, "w") as fh:
            json.dump(manifest, fh)
    return dst


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
def test_manifest_names_everything_the_engine_depends_on(engines, tiny_ckpt):
    from mova_rt import fp8
    m = json.load(open(os.path.join(engines["fp8"], E.MANIFEST)))
    assert m["format"] == E.FORMAT
    assert m["checkpoint"]["digest"] == fp8.source_digest(tiny_ckpt)
    assert m["config"]["model"]["video_dit"]["dim"] > 0 and len(m["config"]["digest"]) == 64
    assert m["request"] == {"height": 64, "width": 96, "num_frames": 17, "fps": 24.0,
                            "precision": "fp8", "backend": "inductor", "kernels": "reference",
                            "fp8_weights": None}
    # 17 frames -> 5 latent frames, 8x12 latents, 2x2 patches: 5*4*6 video tokens
    assert m["shapes"]["video_tokens"] == 120 and m["shapes"]["audio_tokens"] > 0
    assert m["shapes"]["max_batch"] == E.MAX_BATCH
    assert m["machine"]["device"] == "cpu"
    assert m["versions"]["torch"] == torch.__version__ and "cuda" in m["versions"]
    # the two experts share a config, so one video unit serves both
    assert set(m["units"]) == {"video_block", "audio_block", "bridge_layer"}
    assert m["units"]["video_block"]["towers"] == ["video_dit", "video_dit_2"]
    assert m["units"]["video_block"]["inductor_options"]["emulate_precision_casts"] is True
    assert isinstance(m["units"]["video_block"]["autotune_choices"], list)
    # fp8: the e4m3 weights are in the engine, and the units take them as inputs
    assert m["weights"]["dir"] == "weights"
    sig = {n: d for n, _, d in m["units"]["video_block"]["weights"]}
    assert sig["self_attn.q.weight"] == "float8_e4m3fn" and sig["self_attn.q.weight_scale"] == "float32"
    for rel_path, info in m["artifacts"].items():
        assert os.path.getsize(os.path.join(engines["fp8"], rel_path)) == info["bytes"]
    assert "units/video_block.pt2" in m["artifacts"]
    assert not [f for f in os.listdir(os.path.dirname(engines["fp8"])) if f.startswith(".")]


def test_build_failure_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    calls = []

    def failing(spec, path, device, autotune):
        calls.append(spec.name)
        if len(calls) == 2:
            raise RuntimeError("compiler crashed")
        with open(path, "wb") as fh:
            fh.write(b"x")
        return {}
    monkeypatch.setattr(E, "build_inductor", failing)
    out = tmp_path / "engine"
    with pytest.raises(RuntimeError):
        E.build(E.BuildRequest(tiny_ckpt, **SIZE), str(out), log=lambda m: None)
    assert calls == ["video_block", "audio_block"]
    assert os.listdir(tmp_path) == []          # no engine, no temporary folder


@pytest.mark.parametrize("change, match", [
    (dict(kernels="triton"), "cannot be compiled into an engine"),
    (dict(backend="onnx"), "is not a backend"),
    (dict(height=65), "multiples of 16"),
    (dict(fps=0.0), "must be positive"),
    (dict(device="cuda"), "CUDA is not available"),
    (dict(backend="tensorrt"), "float64, which TensorRT does not have"),
    (dict(backend="tensorrt", kernels="sdpa", precision="fp8"), "static \\(calibrated\\)"),
    (dict(fp8_weights="somewhere"), "pass --precision fp8"),
    (dict(ckpt=None, preset="mova-360p", backend="tensorrt", kernels="sdpa", precision="fp8"),
     "random --preset weights do not have"),
])
def test_build_refuses_bad_requests(tiny_ckpt, tmp_path, change, match):
    if change.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    req = E.BuildRequest(**{"ckpt": tiny_ckpt, **SIZE, **change})
    with pytest.raises(MovaInputError, match=match):
        E.build(req, str(tmp_path / "e"), log=lambda m: None)
    assert not (tmp_path / "e").exists()


def test_build_tensorrt_without_tensorrt_is_refused(tiny_ckpt, tmp_path):
    if E.tensorrt_module() is not None:
        pytest.skip("tensorrt is installed")
    with pytest.raises(MovaInputError, match="needs the tensorrt package"):
        E.build(E.BuildRequest(tiny_ckpt, backend="tensorrt", kernels="sdpa", **SIZE),
                str(tmp_path / "e"))


def test_build_cli_tensorrt_fp8_names_the_calibration_command(tmp_path, capsys):
    """--backend tensorrt defaults to --kernels sdpa (not the float64 reference), and fp8
    without calibrated weights is refused with the command that writes them."""
    assert main(["build", "--backend", "tensorrt", "--precision", "fp8",
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "mova-rt quantize --calibrate" in err and "float64" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


def test_build_tensorrt_fp8_needs_calibrated_weights(engines, tiny_ckpt, tmp_path):
    """fp8 weights that quantize activations per token (the engine's own, written at build) are
    refused for TensorRT before anything is loaded; calibrated ones pass that check."""
    per_token = os.path.join(engines["fp8"], "weights")
    req = E.BuildRequest(tiny_ckpt, backend="tensorrt", kernels="sdpa", precision="fp8",
                         fp8_weights=per_token, **SIZE)
    with pytest.raises(MovaInputError, match="quantizes activations per token"):
        E.build(req, str(tmp_path / "e"), log=lambda m: None)
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------
# run: the engine against the eager path, same weights
# ---------------------------------------------------------------------------------------------
def _forward(pipe, seed=0):
    from mova_rt.models.dual_tower import dual_tower_forward
    g = torch.Generator().manual_seed(seed)
    vin = torch.randn(2, 36, 5, 8, 12, generator=g)
    ain = torch.randn(2, pipe.audio_dit.cfg.in_dim, 36, generator=g)
    text = torch.randn(2, 512, pipe.cfg.video_dit.text_dim, generator=g).bfloat16()
    return dual_tower_forward(pipe.video_dit, pipe.audio_dit, pipe.bridge, vin, ain, text,
                              torch.tensor([900.0]), 24.0, bridge_from=1)


def _count_unit_calls(pipe) -> list:
    calls = []

    def counted(unit):
        def call(w, a):
            calls.append(1)
            return unit(w, a)
        return call
    for block in pipe.video_dit.blocks:
        block._engine_unit = counted(block._engine_unit)
    bridge = pipe.bridge
    bridge._engine_calls = {i: (counted(u), w) for i, (u, w) in bridge._engine_calls.items()}
    return calls


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_engine_matches_eager_path(engines, tiny_ckpt, precision):
    """Tolerance: one forward within 1% (Inductor rounds to bf16 where the eager ops do, but
    lowers attention and reductions in its own order: 0.4% measured), and four CFG steps within
    1.5x the distance from the eager result to the same run one precision up (fp32 for bf16,
    bf16 for fp8): the random tiny model amplifies every rounding step by step (bf16 vs fp32:
    2.0% after 4 steps; the engine: 2.3%)."""
    # fp8 engines hold every quantizable layer in e4m3: the eager twin too
    eager = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision=precision,
                                         fp8_gemm="scaled_mm")
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=engines[precision])
    assert pipe.precision == precision and pipe.engine is not None
    assert type(pipe.video_dit.blocks[0]).__name__ == "EngineDiTBlock"
    assert type(pipe.video_dit_2.blocks[-1]).__name__ == "EngineDiTBlock"
    assert type(pipe.bridge).__name__ == "EngineBridge"
    if precision == "fp8":
        assert type(pipe.video_dit.blocks[0].self_attn.q).__name__ == "Fp8Linear"
    calls = _count_unit_calls(pipe)
    (ev, ea), (gv, ga) = _forward(eager), _forward(pipe)
    n_bridge = len(pipe.bridge.layers)
    assert len(calls) == len(pipe.video_dit.blocks) + n_bridge
    assert rel(ev, gv) < 1e-2 and rel(ea, ga) < 1e-2, (rel(ev, gv), rel(ea, ga))

    a, b = eager(**RUN), pipe(**RUN)
    fp32 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32")(**RUN) if precision == "bf16" \
        else MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")(**RUN)
    for name in ("video_latents", "audio_latents"):
        floor = rel(getattr(a, name), getattr(fp32, name))
        got = rel(getattr(a, name), getattr(b, name))
        assert got <= 1.5 * max(floor, 1e-3), (name, got, floor)


def test_engine_with_group_offload_is_bit_identical(engines, tiny_ckpt):
    plain = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=engines["bf16"])
    group = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=engines["bf16"],
                                         offload="group")
    a, b = plain(**RUN), group(**RUN)
    assert torch.equal(a.video_latents, b.video_latents)
    assert torch.equal(a.audio_latents, b.audio_latents)


def test_engine_with_bf16_lora_applies_the_lora(engines, tiny_ckpt, tmp_path):
    """A bf16 engine's units take the weights as inputs, so a LoRA merged at load applies."""
    from safetensors.torch import save_file
    eager_base = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    dim = eager_base.video_dit.dim
    g = torch.Generator().manual_seed(5)
    lora = tmp_path / "lora.safetensors"
    save_file({"video_dit.blocks.0.self_attn.q.lora_A.weight": torch.randn(2, dim, generator=g),
               "video_dit.blocks.0.self_attn.q.lora_B.weight": torch.randn(dim, 2, generator=g)},
              str(lora))
    eager = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", lora_path=str(lora))
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", lora_path=str(lora),
                                        engine=engines["bf16"])
    (ev, _), (gv, _), (bv, _) = _forward(eager), _forward(pipe), _forward(eager_base)
    assert rel(ev, gv) < 1e-2 < rel(ev, bv)


def test_engine_batches_one_to_three_passes(engines, tiny_ckpt):
    """Sequential passes (batch 1) and Dual CFG batched (3 rows, the bridge on 2) run the same
    units as CFG's batch of 2."""
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=engines["bf16"])
    eager = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    for kw in (dict(cfg_batch=False), dict(bridge_cfg_scale=2.0)):
        a, b = eager(**RUN, **kw), pipe(**RUN, **kw)
        assert torch.isfinite(b.video_latents).all()
        assert rel(a.video_latents, b.video_latents) < 0.05


# ---------------------------------------------------------------------------------------------
# refusals, through the command line (one line, exit 2, nothing written)
# ---------------------------------------------------------------------------------------------
def _generate(capsys, tmp_path, ckpt, engine, *extra):
    out = tmp_path / "out" / "x.mp4"
    code = main(["generate", "--ckpt_path", ckpt, "--prompt", "x", "--height", "64", "--width",
                 "96", "--num_frames", "17", "--num_inference_steps", "2", "--no-progress",
                 "--output_path", str(out), "--engine", engine, *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return code, errors, out


def _set(path, value):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


REFUSED = {
    "height": (["--height", "80"], None, "--height 80 (built for 64)", "--height 80 --width 96"),
    "frames": (["--num_frames", "21"], None, "--num_frames 21 (built for 17)", "mova-rt build"),
    "fps": (["--fps", "25"], None, "--fps 25 (built for 24)", "--fps 25"),
    "precision": (["--precision", "fp8"], None, "engine", "--precision fp8 --backend inductor"),
    "kernels": (["--kernels", "triton"], None, "--kernels reference", "drop --kernels"),
    "fp8_weights": (["--fp8_weights", "/tmp"], None, "brings its own fp8 weights", None),
    "device": ([], _set(("machine",), {"device": "cuda", "name": "NVIDIA H100 80GB HBM3",
                                       "capability": "9.0"}),
               "built for cuda (NVIDIA H100 80GB HBM3, compute capability 9.0)", "mova-rt build"),
    "torch": ([], _set(("versions", "torch"), "2.0.0"), "torch 2.0.0", "rebuild it here"),
    "mova_rt": ([], _set(("versions", "mova_rt"), "0.0.1"), "mova_rt 0.0.1", "rebuild"),
    "config": ([], _set(("config", "digest"), "0" * 64), "model config", "rebuild"),
    "format": ([], _set(("format",), "mova-rt-engine/0"), "this mova-rt reads", "mova-rt build"),
    "manifest_field": ([], lambda m: m.pop("units"), "lacks 'units'", "build the engine again"),
    "weights": ([], _set(("units", "video_block", "weights", 0, 1), [1, 6, 7]),
                "unit video_block was built for other weights", "rebuild"),
    "plans_field": ([], _set(("units", "video_block", "layers"), {}), "lacks 'bound_weights'",
                    "build the engine again"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_generate_refuses_a_mismatched_engine(case, engines, tiny_ckpt, tmp_path, capsys):
    extra, edit, match, fix = REFUSED[case]
    engine = damaged_copy(engines["bf16"], tmp_path / "engine", edit) if edit else engines["bf16"]
    code, errors, out = _generate(capsys, tmp_path, tiny_ckpt, engine, *extra)
    assert code == 2 and len(errors) == 1 and match in errors[0], errors
    if fix:
        assert fix in errors[0], errors
    assert not out.exists()


def test_machine_check_refuses_another_gpu_capability(engines, tmp_path, monkeypatch):
    """A CUDA engine on a GPU of another compute capability (simulated: no GPU here)."""
    engine = E.open_engine(damaged_copy(engines["bf16"], tmp_path / "e", _set(
        ("machine",), {"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"})))
    monkeypatch.setattr(E, "machine", lambda device: {"device": "cuda", "name": "NVIDIA A100",
                                                      "capability": "8.0"})
    with pytest.raises(MovaInputError, match=r"compute capability 9.0 \(NVIDIA H100 80GB HBM3\), "
                                             r"this GPU is 8.0 \(NVIDIA A100\)"):
        engine.check_machine("cpu")
    monkeypatch.setattr(E, "machine", lambda device: {"device": "cuda", "name": "NVIDIA H200",
                                                      "capability": "9.0"})
    engine.manifest["versions"].update(E.versions("inductor"))
    with pytest.warns(UserWarning, match="tuned on NVIDIA H100"):
        engine.check_machine("cpu")        # same capability, another model: runs, with a warning


def test_generate_refuses_another_checkpoint(engines, tiny_ckpt, tmp_path, capsys):
    from mova_rt.checkpoint import make_checkpoint
    other = str(tmp_path / "other")
    make_checkpoint("tiny", other, seed=1)
    code, errors, out = _generate(capsys, tmp_path, other, engines["bf16"])
    assert code == 2 and "built from another checkpoint" in errors[0]
    assert f"--ckpt_path {other}" in errors[0]
    assert not out.exists()


def test_generate_refuses_lora_with_an_fp8_engine(engines, tiny_ckpt, tmp_path, capsys):
    code, errors, _ = _generate(capsys, tmp_path, tiny_ckpt, engines["fp8"], "--lora_path",
                                str(tmp_path / "lora.safetensors"))
    assert code == 2 and "quantized without the LoRA" in errors[0]


def _truncate(folder):
    path = os.path.join(folder, "units", "audio_block.pt2")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def _flip(folder):
    path = os.path.join(folder, "units", "bridge_layer.pt2")
    with open(path, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))


DAMAGED = {
    "missing_unit": (lambda d: os.remove(os.path.join(d, "units", "video_block.pt2")),
                     "units/video_block.pt2 is missing"),
    "truncated_unit": (_truncate, "units/audio_block.pt2 is"),
    "corrupt_unit": (_flip, "differs from what the build wrote"),
    "no_manifest": (lambda d: os.remove(os.path.join(d, E.MANIFEST)), "has no manifest.json"),
    "garbage_manifest": (lambda d: open(os.path.join(d, E.MANIFEST), "w").write("{not json"),
                         "manifest.json is unreadable"),
    "fp8_weights": (lambda d: os.remove(os.path.join(d, "weights", "audio_dit.fp8.safetensors")),
                    "weights/audio_dit.fp8.safetensors is missing"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_generate_refuses_a_damaged_engine(case, engines, tiny_ckpt, tmp_path, capsys):
    damage, match = DAMAGED[case]
    engine = damaged_copy(engines["fp8"], tmp_path / "engine")
    damage(engine)
    code, errors, out = _generate(capsys, tmp_path, tiny_ckpt, engine)
    assert code == 2 and len(errors) == 1 and match in errors[0], errors
    assert not out.exists()


def test_generate_refuses_a_missing_engine_folder(tiny_ckpt, tmp_path, capsys):
    code, errors, _ = _generate(capsys, tmp_path, tiny_ckpt, str(tmp_path / "nope"))
    assert code == 2 and "is not a folder" in errors[0]


def test_build_and_generate_from_the_command_line(tmp_path, tiny_ckpt):
    """As a user runs it: two processes, the engine written by one and run by the other; the
    mp4 is written and the summary says the engine ran."""
    env = dict(os.environ, MOVA_RT_CACHE=str(tmp_path / "cache"))
    engine, out = tmp_path / "engines" / "tiny", tmp_path / "x.mp4"
    run = lambda *a: subprocess.run([sys.executable, "-m", "mova_rt", *a], capture_output=True,
                                    text=True, env=env, timeout=600)
    size = ("--height", "64", "--width", "96", "--num_frames", "17")
    r = run("build", "--ckpt_path", tiny_ckpt, *size, "--out", str(engine))
    assert r.returncode == 0, r.stderr
    assert "wrote engine" in r.stdout and "Traceback" not in r.stderr
    r = run("build", "--ckpt_path", tiny_ckpt, "--out", str(engine))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--ckpt_path", tiny_ckpt, "--prompt", "x", *size,
            "--num_inference_steps", "3", "--no-progress",
            "--engine", str(engine), "--output_path", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and f"engine {engine}" in r.stderr


# ---------------------------------------------------------------------------------------------
# TensorRT backend: the ONNX export (here), the engines (where TensorRT is installed)
# ---------------------------------------------------------------------------------------------
# the element types TensorRT has (UNDEFINED: a value whose type inference left open)
TENSORRT_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "INT32", "INT64", "BOOL",
                  "UNDEFINED"}


def _onnx_types(path: str) -> set:
    """The element types of every tensor of an ONNX graph (inputs, outputs, intermediates,
    initializers, constants), by name."""
    import onnx
    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    types = {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output,
                                                    *graph.value_info]}
    types |= {t.data_type for t in graph.initializer}
    types |= {a.t.data_type for n in graph.node for a in n.attribute
              if a.type == onnx.AttributeProto.TENSOR}
    return {onnx.TensorProto.DataType.Name(t) for t in types}


def test_onnx_export_of_every_unit_matches_pytorch(tiny_ckpt, tmp_path):
    """Each unit exported as the tensorrt backend exports it (dynamo, weights as inputs, batch
    dynamic), run by onnxruntime at batch 1 and 3 against the PyTorch layer: fp32 weights, so
    the comparison is the export's, not a dtype's (onnxruntime's CPU kernels lack bf16)."""
    ort = pytest.importorskip("onnxruntime")
    from mova_rt.benchmarks.flops import clip_shapes
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", kernels="sdpa", towers_only=True)
    shapes = clip_shapes(pipe.cfg, **SIZE)
    specs = E.unit_specs(pipe, shapes, torch.float32)      # as the tensorrt build exports them
    assert [s.name for s in specs] == ["video_block", "audio_block", "bridge_layer"]
    for spec in specs:
        path = str(tmp_path / f"{spec.name}.onnx")
        info = E.export_onnx(spec, path, torch.device("cpu"))
        assert _onnx_types(path) <= TENSORRT_TYPES, _onnx_types(path) - TENSORRT_TYPES
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        assert names == info["input_names"][:len(names)]
        fn = E.Functional(spec.template, spec.kind)
        for batch in (1, 3):
            weights, acts = E.example_inputs(spec, "cpu", batch=batch, seed=batch)
            feed = dict(zip(info["input_names"], [t.numpy() for t in weights + acts]))
            got = session.run(None, {k: feed[k] for k in names})
            want = fn(weights, acts)
            want = [want] if spec.kind == "block" else list(want)
            for g, w in zip(got, want):
                err = float(torch.tensor(g).sub(w).norm() / w.norm())
                assert err < 1e-5, (spec.name, batch, err)


@pytest.fixture(scope="module")
def calibrated(tiny_ckpt, tmp_path_factory):
    """fp8 weights with static activation scales, written by `mova-rt quantize --calibrate`."""
    pytest.importorskip("modelopt.torch.quantization")
    out = str(tmp_path_factory.mktemp("calibrated") / "fp8")
    size = [str(v) for kv in SIZE.items() for v in (f"--{kv[0]}", kv[1])]
    assert main(["quantize", "--ckpt_path", tiny_ckpt, "--out", out, "--calibrate",
                 "--prompt", "a dog barks", "--prompt", "rain on a tin roof", "--calib_steps",
                 "4", "--device", "cpu", *size]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert {c["activations"] for c in manifest["components"].values()} == {"static-tensor"}
    return out


def test_tensorrt_fp8_layers_export_as_qdq_and_match_pytorch(calibrated, tiny_ckpt, tmp_path):
    """The fp8 TensorRT path up to the plans, on the CPU: a pipeline on calibrated weights with
    the build's settings (kernels sdpa, RoPE tables in float32: TensorRT has no float64); each
    unit exported with its fp8 Linear layers as QuantizeLinear / DequantizeLinear (e4m3fn, the
    static scales); then every layer's graph with that layer's weights bound as constants (what
    its plan is built from), run by onnxruntime at batch 1 and 3 against the layer in PyTorch.
    Activations in fp32 (onnxruntime's CPU kernels lack bf16), so the comparison is the
    export's: the same formula gives 1e-7 (the median must stay under 1e-6); where the two
    runtimes' fp32 rounding puts an activation on the other side of an e4m3 rounding boundary
    one code flips, by 1/16 of its value, and the output moves by up to ~1e-4 (measured max
    2.2e-4 over 24 comparisons; bound 1e-3, 35x below fp8's own 3.5% error against bf16)."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from mova_rt import fp8
    from mova_rt.benchmarks.flops import clip_shapes
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", kernels="sdpa", precision="fp8",
                                        fp8_weights=calibrated, towers_only=True)
    towers = [pipe.video_dit, pipe.video_dit_2, pipe.audio_dit, pipe.bridge]
    for tower in towers:
        for p in tower.parameters():
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
    specs = E.unit_specs(pipe, clip_shapes(pipe.cfg, **SIZE), torch.float32)
    layers, errs = 0, []
    for spec in specs:
        spec.inputs = {k: (shape, torch.float32 if d == torch.bfloat16 else d)
                       for k, (shape, d) in spec.inputs.items()}
        path = str(tmp_path / f"{spec.name}.onnx")
        E.export_onnx(spec, path, torch.device("cpu"))
        ops = [n.op_type for n in onnx.load(path).graph.node]
        n_fp8 = sum(isinstance(m, fp8.Fp8Linear) for m in spec.template.modules())
        assert n_fp8 == 8 and ops.count("QuantizeLinear") == n_fp8, spec.name
        assert ops.count("DequantizeLinear") == 2 * n_fp8           # activations and weights
        assert _onnx_types(path) <= TENSORRT_TYPES, _onnx_types(path) - TENSORRT_TYPES
        for key, layer in E.unit_layers(pipe, spec.towers, spec.kind):
            bound = str(tmp_path / f"{key}.onnx")
            read = E.bind_weights(path, layer, bound)
            names = [n for n, _ in layer.named_parameters()]
            unread = {n for i, n in enumerate(names) if i not in read}   # stay in the module
            assert all(n.startswith(("cross_attn.k.", "cross_attn.v.")) for n in unread), unread
            session = ort.InferenceSession(bound, providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == list(spec.inputs)   # no weights
            fn = E.Functional(layer, spec.kind)
            for batch in (1, 3):
                _, acts = E.example_inputs(spec, "cpu", batch=batch, seed=batch)
                got = session.run(None, dict(zip(spec.inputs, [a.numpy() for a in acts])))
                want = fn([p.detach() for _, p in layer.named_parameters()], acts)
                want = [want] if spec.kind == "block" else list(want)
                for g, w in zip(got, want):
                    err = float(torch.tensor(g).sub(w).norm() / w.norm())
                    errs.append(err)
            layers += 1
    assert layers == sum(len(t.blocks) for t in towers[:3]) + len(pipe.bridge.layers)
    errs.sort()
    assert errs[len(errs) // 2] < 1e-6 and errs[-1] < 1e-3, errs


def test_per_layer_units_run_each_layer_with_its_own_weights(engines, tiny_ckpt, monkeypatch):
    """How a TensorRT fp8 engine runs (one plan per layer holding its weights, the module's
    copy freed), with PyTorch stand-ins for the plans since TensorRT is not installed here:
    every block and bridge layer calls its own plan, with no weights passed, once per forward,
    and the result is the eager path's bit for bit. Such an engine refuses --offload."""
    eager = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    engine = E.open_engine(engines["bf16"])
    called = []

    def stand_in(key, kind):
        module = dict(E.unit_layers(eager, [key.rpartition(".")[0]], kind))[key]
        fn = E.Functional(module, kind)

        def plan(weights, acts):
            assert weights == []
            called.append(key)
            return fn([p for _, p in module.named_parameters()], acts)
        return plan
    for entry in engine.manifest["units"].values():
        entry["layers"] = {k: f"units/{k}.plan" for k, _ in
                           E.unit_layers(eager, entry["towers"], entry["kind"])}
        # what the export reads: all but the text K/V projections (run once per request)
        entry["bound_weights"] = [i for i, (n, *_) in enumerate(entry["weights"])
                                  if not n.startswith(("cross_attn.k.", "cross_attn.v."))]
    monkeypatch.setattr(E.Engine, "load_unit", lambda self, name, device: {
        k: stand_in(k, self.manifest["units"][name]["kind"])
        for k in self.manifest["units"][name]["layers"]})
    assert engine.bound
    with pytest.raises(MovaInputError, match="drop --offload"):
        MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=engine, offload="group")
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=engine)
    freed = {n for n, p in pipe.video_dit.blocks[0].named_parameters() if p.numel() == 0}
    assert freed and not any(n.startswith("cross_attn.k.") for n in freed)
    (ev, ea), (gv, ga) = _forward(eager), _forward(pipe)
    assert torch.equal(ev, gv) and torch.equal(ea, ga)
    want = [f"video_dit.{i}" for i in range(len(pipe.video_dit.blocks))] + \
        [f"dual_tower_bridge.{i}" for i in pipe.bridge.layers] + \
        [f"audio_dit.{i}" for i in range(len(pipe.audio_dit.blocks))]
    assert sorted(called) == sorted(want)


@pytest.mark.skipif(E.tensorrt_module() is None or not torch.cuda.is_available(),
                    reason="TensorRT and a GPU are needed (neither can be installed here)")
def test_tensorrt_engine_matches_eager(tiny_ckpt, tmp_path):
    path = str(tmp_path / "trt")
    E.build(E.BuildRequest(tiny_ckpt, backend="tensorrt", kernels="sdpa", device="cuda", **SIZE),
            path)
    eager = MovaPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="bf16", kernels="sdpa")
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="bf16", engine=path)
    a, b = eager(**RUN), pipe(**RUN)
    fp32 = MovaPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="fp32")(**RUN)
    for name in ("video_latents", "audio_latents"):
        assert rel(getattr(a, name), getattr(b, name)) <= 1.5 * max(
            rel(getattr(a, name), getattr(fp32, name)), 1e-3)


def test_step_cache_with_an_engine(engines, tiny_ckpt):
    """--cache schedule with an engine reuses the same forwards as without one, and the latents
    keep the engine's bound: 1.5x the eager run's distance to fp32 (8 steps, 6 forwards reused:
    1.8% / 1.7% against 1.7% / 1.5%)."""
    run = dict(RUN, num_inference_steps=8, cache="schedule")
    a = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")(**run)
    b = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=engines["bf16"])(**run)
    fp32 = MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32")(**run)
    assert a.reused == b.reused == fp32.reused > 0
    for name in ("video_latents", "audio_latents"):
        floor = rel(getattr(a, name), getattr(fp32, name))
        assert rel(getattr(a, name), getattr(b, name)) <= 1.5 * max(floor, 1e-3), name


def test_inductor_engine_on_calibrated_weights(calibrated, tiny_ckpt, tmp_path):
    """build --fp8_weights: the engine stores the calibrated weights (static scales) and runs
    them: one forward within 1% of the eager path on the same weights (as for per-token)."""
    path = str(tmp_path / "static")
    m = E.build(E.BuildRequest(tiny_ckpt, precision="fp8", fp8_weights=calibrated, **SIZE), path,
                log=lambda msg: None)
    assert m["request"]["fp8_weights"] == os.path.abspath(calibrated)
    assert "--fp8_weights" in E.open_engine(path).fix()
    eager = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", precision="fp8",
                                         fp8_weights=calibrated, fp8_gemm="scaled_mm")
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", engine=path)
    assert pipe.video_dit.blocks[0].self_attn.q.input_scale is not None
    (ev, ea), (gv, ga) = _forward(eager), _forward(pipe)
    assert rel(ev, gv) < 1e-2 and rel(ea, ga) < 1e-2, (rel(ev, gv), rel(ea, ga))


@pytest.mark.skipif(E.tensorrt_module() is None or not torch.cuda.is_available(),
                    reason="TensorRT and a GPU are needed (neither can be installed here)")
def test_tensorrt_fp8_engine_matches_eager(calibrated, tiny_ckpt, tmp_path):
    path = str(tmp_path / "trt-fp8")
    E.build(E.BuildRequest(tiny_ckpt, backend="tensorrt", kernels="sdpa", precision="fp8",
                           fp8_weights=calibrated, device="cuda", **SIZE), path)
    kw = dict(device="cuda", dtype="bf16", kernels="sdpa")
    eager = MovaPipeline.from_pretrained(tiny_ckpt, precision="fp8", fp8_weights=calibrated,
                                         fp8_gemm="scaled_mm", **kw)
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="bf16", engine=path)
    a, b = eager(**RUN), pipe(**RUN)
    bf16 = MovaPipeline.from_pretrained(tiny_ckpt, **kw)(**RUN)
    for name in ("video_latents", "audio_latents"):
        assert rel(getattr(a, name), getattr(b, name)) <= 1.5 * max(
            rel(getattr(a, name), getattr(bf16, name)), 1e-3)


# ---------------------------------------------------------------------------------------------
# bench: step time with the engine, cold start with and without it
# ---------------------------------------------------------------------------------------------
def test_bench_engine_config_and_cold_start(engines, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOVA_RT_CACHE", str(tmp_path / "cache"))
    # the embedded tiny checkpoint is the engine's only if it is the same files: point the
    # bench at the engine's checkpoint through --ckpt_path
    ckpt = json.load(open(os.path.join(engines["bf16"], E.MANIFEST)))["checkpoint"]["path"]
    path = tmp_path / "bench.json"
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--ckpt_path", ckpt,
                 "--configs", "reference", "--engine", engines["bf16"], "--warmup", "1",
                 "--steps", "2", "--cold-start", "--cold-steps", "2", "--json", str(path),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.load(open(path))
    rows = {r["name"]: r for r in data["configs"]}
    assert set(rows) == {"reference", "engine"} and rows["engine"]["status"] == "ok"
    assert len(rows["engine"]["step_s"]["samples"]) == 2 and rows["engine"]["step_s"]["median"] > 0
    cold = data["cold_start"]
    modes = {r["mode"]: r for r in cold["modes"]}
    assert set(modes) == {"eager", "inductor-jit", "engine"}, modes
    for r in modes.values():
        assert r["status"] == "ok", r
        assert 0 < r["import_s"] < r["process_to_first_step_s"]
        assert r["first_step_s"] > 0 and len(r["later_steps_s"]) == 1
    assert cold["disk_read"]["bytes"] > 0 and cold["disk_read"]["files"] >= 4
    assert "cold start (bf16" in out and "inductor-jit" in out


def test_bench_engine_must_fit_the_clip(engines, tmp_path, capsys):
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--height", "80",
                 "--configs", "reference", "--engine", engines["bf16"], "--warmup", "0",
                 "--steps", "1", "--json", str(tmp_path / "b.json"), "--no-progress"])
    assert code == 0      # a configuration that cannot run is a result, not a crash
    rows = {r["name"]: r for r in json.load(open(tmp_path / "b.json"))["configs"]}
    assert rows["engine"]["status"] == "unavailable"
    assert "--height 80 (built for 64)" in rows["engine"]["message"]


def test_preset_engine_runs_in_bench_and_is_refused_by_generate(tmp_path, tiny_ckpt, capsys):
    """`build --preset`: random weights, an engine for the benchmark only."""
    engine = str(tmp_path / "preset")
    assert main(["build", "--preset", "tiny", "--out", engine]) == 0
    m = json.load(open(os.path.join(engine, E.MANIFEST)))
    assert m["checkpoint"] == {"path": None, "digest": "preset:tiny"}
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--configs", "reference",
                 "--engine", engine, "--warmup", "0", "--steps", "1", "--json",
                 str(tmp_path / "b.json"), "--no-progress"])
    rows = {r["name"]: r for r in json.load(open(tmp_path / "b.json"))["configs"]}
    assert code == 0 and rows["engine"]["status"] == "ok", rows["engine"]
    capsys.readouterr()
    code, errors, _ = _generate(capsys, tmp_path, tiny_ckpt, engine)
    assert code == 2 and "random preset:tiny weights" in errors[0]
    assert f"--ckpt_path {tiny_ckpt}" in errors[0]
