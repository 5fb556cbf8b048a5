"""The document layers: a checkpoint's JSON configs (validate/configs.py), engine and fp8
manifests (validate/manifests.py) and benchmark results files (validate/results.py).

Property-style: every field the rules declare gets random garbage (NaN and Infinity, a NUL
string, and values wrong for that field's kind: a boolean for a number, one past a bound, a
string outside the choices, a list for a mapping, ...), and the command that reads the file must
refuse it in one `error:` line naming the file and the field, with exit code 2. The seed is
fixed; each failure prints the field and the value."""
import json
import os
import random
import shutil

import pytest

from helpers import refused
from mova_rt.validate import schema as S
from mova_rt.validate.configs import MODEL_INDEX, RULES, TEXT_ENCODER
from mova_rt.validate.manifests import RelPath

UNIVERSAL = [float("nan"), float("inf"), -float("inf"), "\x00garbage"]


def kind_garbage(rule) -> list:
    """Values wrong for `rule` whatever else is true (its own kind of mistake)."""
    if isinstance(rule, S.Int):
        return [True, 1.5, "3"] + ([rule.lo - 1] if rule.lo is not None else []) + (
            [rule.hi + 1] if rule.hi is not None else [])
    if isinstance(rule, S.Real):
        return [True, "1.0"] + ([rule.lo - 1.0] if rule.lo is not None else []) + (
            [rule.hi * 2 + 1.0] if rule.hi is not None else [])
    if isinstance(rule, S.Bool):
        return [0, 1, "true", None]
    if isinstance(rule, RelPath):
        return ["/etc/passwd", "../../outside", 3, None]
    if isinstance(rule, S.Str):
        return ([3, [], None] + (["not-one-of-the-choices"] if rule.choices else [])
                + (["has spaces / and ?"] if rule.pattern else []))
    if isinstance(rule, S.Nullable):
        return [v for v in kind_garbage(rule.rule) if v is not None]
    if isinstance(rule, S.List):
        return [{}, "x", [float("nan")]] + ([[]] if rule.min_len > 0 else [])
    if isinstance(rule, (S.Obj, S.Tuple)):
        return [[], "x", 3]
    if isinstance(rule, S.MapOf):
        return [[], "x"] + ([] if isinstance(rule.value, S.Any) else [{"k": float("nan")}])
    return []


def fields(doc, rule, path=()):
    """(path, rule) of every field `rule` declares that `doc` holds, containers included."""
    if isinstance(rule, S.Nullable) and doc is not None:
        rule = rule.rule
    if isinstance(rule, S.Obj) and isinstance(doc, dict):
        for name, sub in rule.fields.items():
            if name in doc:
                yield (*path, name), sub
                yield from fields(doc[name], sub, (*path, name))
    elif isinstance(rule, S.MapOf) and isinstance(doc, dict):
        for key, value in doc.items():
            yield (*path, key), rule.value
            yield from fields(value, rule.value, (*path, key))
    elif isinstance(rule, S.List) and isinstance(doc, list):
        for i, value in enumerate(doc[:2]):             # two entries of a list suffice
            yield (*path, i), rule.item
            yield from fields(value, rule.item, (*path, i))
    elif isinstance(rule, S.Tuple) and isinstance(doc, list):
        for i, (value, sub) in enumerate(zip(doc, rule.items)):
            yield (*path, i), sub
            yield from fields(value, sub, (*path, i))


def mutations(doc, rule, rng):
    """(path, garbage, name of the field) pairs: one universal and one kind-specific value per
    declared field."""
    for path, sub in fields(doc, rule):
        if isinstance(sub, S.Any):
            continue
        name = next(p for p in reversed(path) if isinstance(p, str))
        for value in (rng.choice(UNIVERSAL), rng.choice(kind_garbage(sub) or UNIVERSAL)):
            yield path, value, name


def edited(doc, path, value):
    doc = json.loads(json.dumps(doc))
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return doc


def empty(folder) -> bool:
    """Nothing written there (generate creates the output's folder before any work)."""
    return not os.path.exists(folder) or os.listdir(folder) == []


def write(path, doc):
    with open(path, "w") as fh:     # NaN and Infinity as JSON allows them (Python reads them)
        json.dump(doc, fh)


def check_property(capsys, file, doc, rule, argv, where, seed):
    rng = random.Random(seed)
    count = 0
    for path, value, name in mutations(doc, rule, rng):
        write(file, edited(doc, path, value))
        try:
            line = refused(capsys, argv(count))
        except AssertionError as e:
            raise AssertionError(f"{where} {path} = {value!r}: {e}") from None
        assert where in line and name in line, (path, value, line)
        count += 1
    write(file, doc)
    return count


# ---------------------------------------------------------------------------------------------
# 5. checkpoint configs
# ---------------------------------------------------------------------------------------------
CONFIG_FILES = {
    "model_index.json": MODEL_INDEX, "video_dit/config.json": RULES["VideoDiTConfig"],
    "video_dit_2/config.json": RULES["VideoDiTConfig"],
    "audio_dit/config.json": RULES["AudioDiTConfig"],
    "dual_tower_bridge/config.json": RULES["BridgeConfig"],
    "video_vae/config.json": RULES["VideoVAEConfig"],
    "audio_vae/config.json": RULES["AudioVAEConfig"],
    "scheduler/scheduler_config.json": RULES["SchedulerConfig"],
    "text_encoder/config.json": TEXT_ENCODER,
}


@pytest.fixture
def configs_only(tiny_ckpt, tmp_path):
    """The tiny checkpoint's JSON files alone: every config is read before any weight."""
    dst = tmp_path / "ck"
    for rel in CONFIG_FILES:
        os.makedirs(dst / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(tiny_ckpt, rel), dst / rel)
    return dst


def test_every_config_field_written_has_a_rule(configs_only):
    from mova_rt.config import COMPONENTS, load_config
    load_config(str(configs_only))                       # the baseline is valid
    for rel, rule in CONFIG_FILES.items():
        doc = json.loads((configs_only / rel).read_text())
        free = set(COMPONENTS) if rel == "model_index.json" else set()
        loose = {k for k in doc if not k.startswith("_")} - set(rule.fields) - free
        assert not loose, (rel, loose)


@pytest.mark.parametrize("rel", sorted(CONFIG_FILES))
def test_garbage_in_any_config_field_is_refused(rel, configs_only, tmp_path, capsys):
    out = tmp_path / "out"
    commands = [
        ["generate", "--ckpt_path", configs_only, "--prompt", "x", "--output_path",
         out / "o.mp4", "--no-progress"],
        ["build", "--ckpt_path", configs_only, "--device", "cpu", "--out", out / "e"],
        ["bench", "--ckpt_path", configs_only, "--device", "meta", "--json", out / "b.json"],
        ["quantize", "--ckpt_path", configs_only, "--out", out / "q"],
    ]
    doc = json.loads((configs_only / rel).read_text())
    n = check_property(capsys, configs_only / rel, doc, CONFIG_FILES[rel],
                       lambda i: commands[i % len(commands)], rel, seed=19)
    assert n >= 4 and empty(out)


@pytest.mark.parametrize("rel, field, value, needle", [
    ("scheduler/scheduler_config.json", "num_train_timesteps", 0, "at least 1"),
    ("video_dit/config.json", "num_heads", 0, "at least 1"),
    ("video_dit/config.json", "eps", float("nan"), "NaN (a number)"),
    ("scheduler/scheduler_config.json", "shift", float("nan"), "NaN (a number)"),
    ("audio_vae/config.json", "sample_rate", "48000", '"48000" (a string)'),
    ("model_index.json", "boundary_ratio", "abc", '"abc" (a string)'),
    ("scheduler/scheduler_config.json", "sigma_min", 1.0, "is 1.0 (a number)"),
])
def test_the_reported_config_values_are_refused(rel, field, value, needle, configs_only,
                                                tmp_path, capsys):
    doc = json.loads((configs_only / rel).read_text())
    write(configs_only / rel, dict(doc, **{field: value}))
    line = refused(capsys, ["bench", "--ckpt_path", configs_only, "--device", "meta", "--json",
                            tmp_path / "b.json"])
    assert f"{rel}: field '{field}'" in line and needle in line and "restore" in line, line


def test_a_deeply_nested_config_is_refused(configs_only, capsys):
    for text, needle in (("[" * 100000 + "]" * 100000, "recursion"),
                         ('{"a": ' + "[" * 33 + "]" * 33 + "}", "nested 34 levels deep")):
        (configs_only / "model_index.json").write_text(text)
        line = refused(capsys, ["bench", "--ckpt_path", configs_only, "--device", "meta",
                                "--json", configs_only.parent / "b.json"])
        assert "model_index.json is nested" in line and needle in line, line


# ---------------------------------------------------------------------------------------------
# 6. engine and fp8 manifests
# ---------------------------------------------------------------------------------------------
def fake_engine(folder, ckpt) -> dict:
    """An engine folder whose manifest has every field a build writes (one unit, one artifact):
    enough for the manifest checks, which run before any unit is loaded."""
    import hashlib
    from mova_rt import engine as E
    os.makedirs(folder / "units")
    (folder / "units" / "video_block.pt2").write_bytes(b"unit")
    manifest = {
        "format": E.FORMAT, "created": "2026-12-01T00:00:00+00:00",
        "checkpoint": {"path": str(ckpt), "digest": "0" * 64},
        "config": {"digest": "1" * 64, "model": {"video_dit": {"dim": 64}}},
        "request": {"height": 32, "width": 48, "num_frames": 5, "fps": 24.0, "precision": "bf16",
                    "backend": "inductor", "kernels": "reference", "fp8_weights": None},
        "shapes": {"video_tokens": 12, "audio_tokens": 11, "text_tokens": 512,
                   "latent_grid": [2, 4, 6], "video_grid": [2, 2, 3], "max_batch": 3},
        "machine": {"device": "cpu", "name": "x86_64", "capability": None},
        "versions": {"mova_rt": "0.1.0", "torch": "2.13.0", "triton": None},
        "units": {"video_block": {
            "towers": ["video_dit", "video_dit_2"], "kind": "block",
            "weights": [["modulation", [1, 6, 64], "bfloat16"]],
            "inputs": {"x": [["B", 12, 64], "bfloat16"], "rope_cos": [[12, 16], "float64"]},
            "inductor_options": {"emulate_precision_casts": True}, "autotune_choices": [],
            "files": ["units/video_block.pt2"], "build_s": 1.5}},
        "weights": None,
        "artifacts": {"units/video_block.pt2": {
            "bytes": 4, "sha256": hashlib.sha256(b"unit").hexdigest()}},
        "build_s": 2.0,
    }
    write(folder / "manifest.json", manifest)
    return manifest


def test_garbage_in_any_engine_manifest_field_is_refused(tiny_ckpt, tmp_path, capsys):
    from mova_rt import engine as E
    from mova_rt.validate.manifests import check_engine_manifest, engine_rule
    folder = tmp_path / "engine"
    manifest = fake_engine(folder, tiny_ckpt)
    check_engine_manifest(manifest, str(folder), "manifest.json")      # the baseline is valid
    out = tmp_path / "out"
    argv = ["generate", "--ckpt_path", tiny_ckpt, "--prompt", "x", "--engine", folder,
            "--output_path", out / "o.mp4", "--no-progress"]
    rule = engine_rule(E.FORMAT, E.BACKENDS, E.PRECISIONS, E.KERNELS)
    n = check_property(capsys, folder / "manifest.json", manifest, rule, lambda i: argv,
                       "manifest.json", seed=6)
    assert n > 80 and empty(out)


def test_engine_manifest_paths_stay_inside_the_engine(tiny_ckpt, tmp_path, capsys):
    folder = tmp_path / "engine"
    manifest = fake_engine(folder, tiny_ckpt)
    manifest["artifacts"] = {"../../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}
    write(folder / "manifest.json", manifest)
    line = refused(capsys, ["bench", "--preset", "tiny", "--device", "cpu", "--engine", folder,
                            "--json", tmp_path / "b.json"])
    assert "'artifacts.../../../etc/passwd'" in line and "inside the folder" in line, line
    assert not (tmp_path / "b.json").exists()


def fake_fp8(folder, ckpt) -> dict:
    from mova_rt.fp8.quantize import COMPONENTS, FORMAT, SCHEME
    from mova_rt.fp8.weights import source_digest
    os.makedirs(folder)
    manifest = {"format": FORMAT, "scheme": SCHEME, "source": str(ckpt),
                "source_digest": source_digest(ckpt),
                "components": {c: {"file": f"{c}.fp8.safetensors",
                                   "layers": {"blocks.0.self_attn.q": [64, 64]},
                                   "activations": "dynamic-token"} for c in COMPONENTS}}
    write(folder / "manifest.json", manifest)
    return manifest


def test_garbage_in_any_fp8_manifest_field_is_refused(tiny_ckpt, tmp_path, capsys):
    from mova_rt.validate.manifests import fp8_rule
    folder = tmp_path / "fp8"
    manifest = fake_fp8(folder, tiny_ckpt)
    out = tmp_path / "out"
    argv = ["generate", "--ckpt_path", tiny_ckpt, "--prompt", "x", "--precision", "fp8",
            "--fp8_weights", folder, "--output_path", out / "o.mp4", "--no-progress"]
    n = check_property(capsys, folder / "manifest.json", manifest, fp8_rule(), lambda i: argv,
                       "manifest.json", seed=8)
    assert n > 20 and empty(out)


# ---------------------------------------------------------------------------------------------
# 7. results files (bench --render), and a bench that fails on a corrupt checkpoint
# ---------------------------------------------------------------------------------------------
def full_results(tmp_path) -> dict:
    """A results file with every section the table and the chart read: the plan of a real
    `bench --device meta` run, and rows of each kind."""
    from mova_rt.cli import main
    js = tmp_path / "plan.json"
    assert main(["bench", "--preset", "tiny", "--device", "meta", "--json", str(js),
                 "--no-progress"]) == 0
    data = json.loads(js.read_text())
    os.remove(js)
    spread = {"median": 0.2, "min": 0.1, "max": 0.3}
    data.update(
        ceilings={"matmul": {"what": "bf16 matmul", "value": 1.5, "unit": "TFLOP/s"}},
        vram_budget_gib=12.0,
        build={"status": "ok", "weights_gib": 0.1, "source": "random", "seconds": 1.0},
        configs=[{"name": "reference", "status": "ok", "message": None, "step_s": spread,
                  "tflops": 1.0, "towers_s_per_forward": {"video_blocks": 0.01, "rest": None},
                  "fraction_of_matmul_ceiling": 0.5, "ratio_to_first": 1.0,
                  "peak_vram_allocated_gib": 0.0, "peak_vram_device_gib": 0.0,
                  "peak_rss_gib": 0.5},
                 {"name": "triton", "status": "oom", "message": "out of memory"}],
        cold_start={"precision": "bf16", "steps": 3, "weights_read_bound_s": 0.5,
                    "disk_read": {"bytes": 1e9, "seconds": 0.5, "gb_per_s": 2.0,
                                  "page_cache_dropped": False},
                    "modes": [{"mode": "eager", "status": "ok", "process_to_first_step_s": 5.0,
                               "import_s": 1.0, "load_s": 2.0, "text_and_vae_s": 0.5,
                               "first_step_s": 0.3, "later_step_median_s": 0.2}]},
        ops=[{"op": "gemm", "backend": "torch", "status": "ok", "median_ms": 1.0, "min_ms": 0.9,
              "max_ms": 1.1, "rate": 10.0, "unit": "TFLOP/s", "fraction_of_ceiling": 0.5,
              "shape": [64, 64]}],
        stages={"text": {"status": "ok", "median_s": 0.1, "min_s": 0.1, "max_s": 0.1}})
    return data


def test_garbage_in_any_results_field_is_refused(tmp_path, capsys):
    from mova_rt.benchmarks.suite import SCHEMA
    from mova_rt.cli import main
    from mova_rt.validate.results import results_rule
    data = full_results(tmp_path)
    js = tmp_path / "r.json"
    write(js, data)
    assert main(["bench", "--render", str(js), "--chart", str(tmp_path / "ok.png")]) == 0
    chart = tmp_path / "c.png"
    n = check_property(capsys, js, data, results_rule(SCHEMA),
                       lambda i: ["bench", "--render", js, "--chart", chart], str(js), seed=7)
    assert n > 80 and not chart.exists()


@pytest.mark.parametrize("section", ["environment", "shapes", "preset"])
def test_a_results_file_missing_a_section_is_refused(section, tmp_path, capsys):
    data = {"schema": "mova-rt-bench/1", "environment": {"device_type": "cpu", "torch": "2",
                                                          "commit": "abc"},
            "preset": "tiny", "shapes": {"height": 64, "width": 96, "num_frames": 17, "fps": 24,
                                         "L_v": 60, "L_a": 36, "L_t": 512}}
    del data[section]
    write(tmp_path / "r.json", data)
    line = refused(capsys, ["bench", "--render", tmp_path / "r.json"])
    assert f"lacks '{section}'" in line, line


def test_bench_on_a_corrupt_checkpoint_writes_nothing(tiny_copy, tmp_path, capsys):
    """Refused before the first results file is written; an earlier file stays as it was."""
    with open(os.path.join(tiny_copy, "audio_dit", "diffusion_pytorch_model.safetensors"),
              "r+b") as fh:
        fh.truncate(1000)
    js = tmp_path / "b.json"
    js.write_text('{"earlier": true}')
    line = refused(capsys, ["bench", "--preset", "tiny", "--device", "cpu", "--ckpt_path",
                            tiny_copy, "--steps", "1", "--warmup", "0", "--json", js,
                            "--no-progress"])
    assert "audio_dit" in line and "truncated or corrupt" in line, line
    assert js.read_text() == '{"earlier": true}'
    assert sorted(os.listdir(tmp_path)) == ["b.json", "tiny"]


def test_bench_restores_its_results_file_on_late_bad_input(tmp_path, monkeypatch, capsys):
    """Bad input found after the first write (here a refusal raised by the step phase) leaves
    the results file as it was before the run."""
    from mova_rt.benchmarks import suite
    from mova_rt.errors import MovaInputError

    def refuse(*a, **k):
        raise MovaInputError("refused late")
    monkeypatch.setattr(suite, "_step_phase", refuse)
    js = tmp_path / "b.json"
    js.write_text('{"earlier": true}')
    line = refused(capsys, ["bench", "--preset", "tiny", "--device", "cpu", "--same-process",
                            "--steps", "1", "--json", js, "--no-progress"])
    assert "refused late" in line and js.read_text() == '{"earlier": true}'
    assert sorted(os.listdir(tmp_path)) == ["b.json"]
    js.unlink()
    refused(capsys, ["bench", "--preset", "tiny", "--device", "cpu", "--same-process",
                     "--steps", "1", "--json", js, "--no-progress"])
    assert os.listdir(tmp_path) == []
