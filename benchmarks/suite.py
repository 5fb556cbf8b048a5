"""`mova-rt bench`: the whole suite in one process, in this order:

1. environment, shapes and the work of one forward (the meta-device plan: parameters, FLOPs counted
   on the real code against the spec's formulas, an activation-memory estimate);
2. ceilings (bf16 matmul, device copy, pinned host-to-device copy);
3. `--ops`: per-op microbenchmarks at the real shapes, every available backend;
4. the step benchmark of `--configs`, side by side on shared weights (unless `--steps 0`);
5. `--time-stages`: text encoding and the VAEs, apart from the steps;
6. `--cold-start`: process start to the first step, and the first steps, in fresh processes, with
   and without an engine (`--engine DIR` also adds the configuration `engine` to step 4);
then a table on stdout, the JSON (rewritten after every phase, so a cut-off run keeps what it
measured) and a PNG chart. `--device meta` stops after 1: the full-size path without a GPU.
Out of memory is a result, not a crash.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

from mova_rt.config import PRESET_SIZES, PRESETS, load_config, preset_config
from mova_rt.errors import MovaInputError
from mova_rt.files import check_output_path, kept_unless_bad_input, remove_quietly, temp_path

from .configs import CONFIGS, parse_configs
from .flops import SPEC_PFLOP_PER_FORWARD, clip_shapes
from .measure import GIB, environment, rss_bytes
from .report import print_report, render_chart

SCHEMA = "mova-rt-bench/1"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="step time, VRAM and host RAM of runtime configurations, "
                                     "per-op microbenchmarks and ceilings")
    p.add_argument("--preset", choices=tuple(PRESETS), default="mova-360p",
                   help="architecture and default clip size (default mova-360p)")
    p.add_argument("--ckpt_path", default=None,
                   help="load weights (and the architecture) from a MOVA checkpoint instead of "
                        "random bf16 weights")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num_frames", type=int, default=None)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--configs", "--kernels", dest="configs", default="auto",
                   help=f"comma-separated runtime configurations ({', '.join(CONFIGS)}); the "
                        "first is the baseline of the ratios")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per configuration")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per configuration (0: no step benchmark)")
    p.add_argument("--num_inference_steps", type=int, default=50,
                   help="the schedule the timed steps are taken from")
    p.add_argument("--cfg_scale", type=float, default=5.0)
    p.add_argument("--ops", action="store_true", help="per-op microbenchmarks at the real shapes")
    p.add_argument("--op-seconds", dest="op_seconds", type=float, default=1.0, metavar="S",
                   help="--ops: about how long each backend of each op is timed (default 1)")
    p.add_argument("--time-stages", dest="time_stages", action="store_true",
                   help="also time text encoding and the VAEs (not part of a step)")
    p.add_argument("--vram-budget", dest="vram_budget", type=float, default=None, metavar="GB",
                   help="cap this process's GPU memory (GiB) to see what fits a smaller card")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N, cpu, or meta (plan only: shapes, FLOPs, memory estimate)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="results file (default: bench_<date>_<device>_<preset>.json here)")
    p.add_argument("--chart", default=None, metavar="PATH",
                   help="PNG chart (default: the JSON path with .png)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only render the table and chart of an existing results file")
    p.add_argument("--engine", default=None, metavar="DIR",
                   help="an engine from `mova-rt build` for this clip size: adds the "
                        "configuration `engine` and the engine row of --cold-start")
    p.add_argument("--cold-start", dest="cold_start", action="store_true",
                   help="time process start -> first denoising step in fresh processes (eager, "
                        "triton, inductor-jit, engine); needs --ckpt_path or --preset tiny")
    p.add_argument("--cold-steps", dest="cold_steps", type=int, default=3,
                   help="denoising steps each cold-start process runs (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--same-process", dest="same_process", action="store_true",
                   help="run every configuration in this process, side by side on shared "
                        "weights, steps alternating (default: each in a process of its own, so "
                        "one configuration's memory never counts against another's)")
    p.add_argument("--config-timeout", dest="config_timeout", type=float, default=None,
                   metavar="S", help="seconds each configuration's process may run; past it "
                                     "it is killed and reported as a timeout with the steps it "
                                     "finished, and the others still run")
    p.add_argument("--forward-error", dest="forward_error", action="store_true",
                   help="also run one forward of every configuration on the same weights and "
                        "inputs and report its relative error against the first configuration, "
                        "per tower (e.g. --configs reference,fp8)")
    p.add_argument("--child-of", dest="child_of", type=int, default=None,
                   help=argparse.SUPPRESS)     # a configuration's own process (isolate.py)
    p.add_argument("--save-forward", dest="save_forward", default=None,
                   help=argparse.SUPPRESS)     # where a child saves its forward (isolate.py)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


# ---------------------------------------------------------------------------------------------
def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MovaInputError(f"--device {name} is not a device: use cuda, cuda:N, cpu or meta") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MovaInputError(f"--device {name} requested but CUDA is not available: use "
                             "--device cpu (small presets) or --device meta (plan only)")
    if dev.type not in ("cuda", "cpu", "meta"):
        raise MovaInputError(f"--device {name} is not supported: use cuda, cpu or meta")
    return dev


def _validate(args) -> tuple:
    device = _device(args.device)
    if args.warmup < 0 or args.steps < 0:
        raise MovaInputError("--warmup and --steps must be 0 or more")
    if args.num_inference_steps < 1:
        raise MovaInputError("--num_inference_steps must be at least 1")
    if args.fps <= 0:
        raise MovaInputError(f"--fps {args.fps} must be positive")
    if args.vram_budget is not None:
        if device.type != "cuda":
            raise MovaInputError("--vram-budget caps GPU memory: it needs --device cuda")
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        if not 0 < args.vram_budget <= total:
            raise MovaInputError(f"--vram-budget {args.vram_budget} must be in (0, {total:.1f}] "
                                 "GiB, the memory of this GPU")
    if args.ckpt_path and not os.path.isdir(args.ckpt_path):
        raise MovaInputError(f"--ckpt_path {args.ckpt_path} is not a folder: point it at a "
                             "MOVA checkpoint (or leave it out for random weights)")
    cfg = load_config(args.ckpt_path) if args.ckpt_path else preset_config(args.preset)
    h, w, f = PRESET_SIZES[args.preset]
    shapes = clip_shapes(cfg, args.height or h, args.width or w, args.num_frames or f, args.fps)
    _check_fits(args, cfg, shapes, device)
    extra = {}
    if args.engine:
        from .configs import engine_config
        extra["engine"] = engine_config(args.engine, shapes)
        if "engine" not in [n.strip() for n in args.configs.split(",")]:
            args.configs += ",engine"
    configs = parse_configs(args.configs, extra)
    if args.cold_start:
        if args.cold_steps < 2:
            raise MovaInputError("--cold-steps must be at least 2 (the first step and a later one)")
        if not args.ckpt_path and args.preset != "tiny":
            raise MovaInputError("--cold-start times reading a checkpoint: pass --ckpt_path (or "
                                 "--preset tiny for the embedded tiny model)")
        if device.type == "meta":
            raise MovaInputError("--cold-start runs the model: use --device cuda or cpu")
    if args.json is None:
        args.json = default_json_name(device, args.preset)
    check_output_path(args.json, suffix=".json")
    if args.chart is None:
        args.chart = os.path.splitext(args.json)[0] + ".png"
    check_output_path(args.chart, suffix=".png")
    return device, cfg, shapes, configs


def _check_fits(args, cfg, shapes, device) -> None:
    """Before anything is written: the clip must fit the device (mova_rt.validate.memory: the
    memory plan; on meta, the plan must be computable), and a checkpoint's tower weights must
    match its configs (their safetensors headers: a truncated file is refused here, not in a
    child process after the results file was written)."""
    from mova_rt.sampler import Guidance
    from mova_rt.validate.memory import check_fits
    if args.child_of is not None:
        return                  # a configuration's own process: its parent checked all this
    batch = len(Guidance(args.cfg_scale).passes())
    check_fits(cfg, shapes, device, batch, decode=args.time_stages, towers_only=True)
    if args.ckpt_path:
        from .bench_step import TOWERS, WEIGHT_DTYPE, tower_config
        from mova_rt.loader import load_state
        from mova_rt.ops import resolve
        for name, cls in TOWERS:
            with torch.device("meta"):
                module = cls(tower_config(cfg, name), resolve("reference")).to(WEIGHT_DTYPE)
            load_state(module, args.ckpt_path, name, WEIGHT_DTYPE, "meta", defer=lambda k: True)


def default_json_name(device: torch.device, preset: str) -> str:
    """bench_<date>_<device>_<preset>.json, the device named by its model (e.g. nvidia-h100-80gb-hbm3)."""
    name = device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_properties(device).name
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"bench_{datetime.date.today().isoformat()}_{slug}_{preset}.json"


def write_json(path: str, data: dict):
    """Written to a temporary name and renamed: a reader never sees half a file."""
    tmp = temp_path(path, ".json")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


class Log:
    def __init__(self, enabled: bool):
        self.enabled, self.t0 = enabled, time.perf_counter()

    def __call__(self, msg: str):
        if self.enabled:
            print(f"[bench {time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr,
                  flush=True)


# ---------------------------------------------------------------------------------------------
def run(args) -> int:
    if args.render:
        return _render_only(args.render, args.chart)
    device, cfg, shapes, configs = _validate(args)
    log = Log(args.progress)
    if args.child_of is not None:
        return _child(args, cfg, shapes, device, configs, log)
    with kept_unless_bad_input(args.json):     # bad input found late: the file as it was
        return _suite(args, device, cfg, shapes, configs, log)


def _suite(args, device, cfg, shapes, configs, log) -> int:
    full = args.preset != "tiny" and device.type == "cuda"
    data = {"schema": SCHEMA, "complete": False,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(device), "preset": args.preset,
            "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "shapes": shapes.as_dict()}

    from .plan import meta_plan
    log(f"plan: {args.preset} on meta, L_v {shapes.L_v}, L_a {shapes.L_a}")
    plan = meta_plan(cfg, shapes)
    data["plan"] = plan
    data["work"] = {"flops_per_forward": plan["flops_formula_total"],
                    "flops_per_forward_by_component": plan["flops_formula"],
                    "spec_pflop_per_forward": SPEC_PFLOP_PER_FORWARD.get(args.preset)}
    write_json(args.json, data)
    if device.type == "meta":
        data["complete"] = True
        write_json(args.json, data)
        print_report(data)
        print(f"wrote {args.json}")
        return 0

    if args.vram_budget is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.vram_budget * GIB / total, device)
        data["vram_budget_gib"] = args.vram_budget

    from .ceilings import measure_ceilings
    log("ceilings")
    data["ceilings"] = measure_ceilings(device, full)
    write_json(args.json, data)

    if args.ops:
        from .bench_ops import run_ops
        data["ops"] = run_ops(cfg, shapes, device, data["ceilings"], full, log, args.op_seconds)
        write_json(args.json, data)

    if args.steps > 0:
        import tempfile

        from .bench_step import forward_errors
        with tempfile.TemporaryDirectory(prefix="mova-forward-") as tmp:
            paths = {rc.name: os.path.join(tmp, f"{rc.name}.safetensors") if args.forward_error
                     else None for rc in configs}
            if args.same_process:
                _step_phase(args, cfg, shapes, device, configs, data, log,
                            forward_out=paths.get if args.forward_error else None)
            else:
                from .isolate import finish_rows, run_isolated
                free_device_memory(device)         # the children's peaks are theirs alone
                rows, builds = run_isolated(args, configs, log, paths)
                data["configs"] = finish_rows(rows, data["work"]["flops_per_forward"],
                                              data["ceilings"])
                data["build"] = next((b for b in builds.values() if b), None) or {
                    "status": "failed", "message": "no configuration built its weights"}
            errors = forward_errors(paths) if args.forward_error else {}
        for row in data.get("configs", []):
            if row["name"] in errors:
                row["forward_error_vs_first"] = errors[row["name"]]
        write_json(args.json, data)

    if args.cold_start:
        from .cold_start import run_cold_start
        from mova_rt.tiny import embedded_tiny_checkpoint
        ckpt = args.ckpt_path or embedded_tiny_checkpoint()
        kernels_ok = device.type == "cuda"
        data["cold_start"] = run_cold_start(ckpt, args.engine, shapes, device, args.cold_steps,
                                            kernels_ok, log)
        write_json(args.json, data)

    if args.time_stages:
        from .bench_stages import run_stages
        data["stages"] = run_stages(cfg, shapes, device, args.ckpt_path, args.seed,
                                    reps=2 if full else 1, log=log)

    data["peak_rss_process_gib"] = _process_peak_rss() / GIB
    data["complete"] = True
    write_json(args.json, data)
    print_report(data)
    print(f"wrote {args.json}")
    chart = render_chart(data, args.chart)
    print(f"wrote {args.chart}" if chart else f"chart skipped: {chart.reason}")
    return 0


def _child(args, cfg, shapes, device, configs, log) -> int:
    """One configuration's own process (isolate.py): its weights, its steps, its row, rewritten
    after every step so a parent that kills it at its time limit still has the finished steps."""
    from .flops import forward_flops
    data = {"schema": SCHEMA, "complete": False, "child": True,
            "work": {"flops_per_forward": sum(forward_flops(cfg, shapes).values())},
            "ceilings": {}}

    def progress(rows):
        data["configs"] = rows
        write_json(args.json, data)
    _step_phase(args, cfg, shapes, device, configs, data, log, progress, release=True,
                forward_out=(lambda name: args.save_forward) if args.save_forward else None)
    data["peak_rss_process_gib"] = _process_peak_rss() / GIB
    for row in data.get("configs", []):
        row["peak_rss_process_gib"] = data["peak_rss_process_gib"]
    data["complete"] = True
    write_json(args.json, data)
    return 0


def free_device_memory(device):
    from .bench_step import free_device_memory as free
    free(device)


def _step_phase(args, cfg, shapes, device, configs, data, log, progress=None, release=False,
                forward_out=None):
    from .bench_step import (_oom_message, build_shared_weights, make_inputs, run_steps,
                             summarise)
    log(f"building weights ({'checkpoint ' + args.ckpt_path if args.ckpt_path else 'random bf16'}"
        f" on {device})")
    t0 = time.perf_counter()
    # Offload configurations alone keep the shared weights in host memory (see configs.py).
    weights_device = torch.device("cpu") if all(rc.host_weights for rc in configs) else device
    try:
        shared = build_shared_weights(cfg, weights_device, args.ckpt_path, args.seed)
        inputs = make_inputs(cfg, shapes, device, args.seed)
    except torch.OutOfMemoryError as e:
        msg = _oom_message(e, device, "weight build")
        if "plan" in data:
            est = data["plan"]["vram_estimate_gib"]
            msg += f"; the estimate for one forward is {est:.1f} GiB + the CUDA context"
        data["build"] = {"status": "oom", "message": msg}
        data["configs"] = [{"name": rc.name, "description": rc.description, "status": "oom",
                            "message": msg} for rc in configs]
        free_device_memory(device)
        log(msg)
        return
    build_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for m in shared.values() for p in m.parameters())
    data["build"] = {"status": "ok", "seconds": build_s, "weights_gib": weights / GIB,
                     "source": args.ckpt_path or "random"}
    log(f"weights: {weights / GIB:.2f} GiB in {build_s:.1f} s")
    flops = data["work"]["flops_per_forward"]
    runs = run_steps(cfg, shapes, device, configs, args.warmup, args.steps, shared, inputs,
                     args.cfg_scale, args.num_inference_steps, log,
                     None if progress is None else lambda rs: progress(summarise(rs, flops, {})),
                     release=release, forward_out=forward_out)
    data["configs"] = summarise(runs, data["work"]["flops_per_forward"], data["ceilings"])
    del shared, inputs
    free_device_memory(device)


def _process_peak_rss() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss_bytes()


def _render_only(path: str, chart: str | None) -> int:
    from mova_rt.validate.results import check_results
    from mova_rt.validate.schema import read_json
    data = read_json(path, "--render results file", "pass a JSON file written by `mova-rt bench`",
                     missing=f"--render {path}: no such results file")
    name = data.get("schema") if isinstance(data, dict) else None
    if name is None:
        raise MovaInputError(f"--render {path} is not a {SCHEMA} results file")
    if isinstance(name, str) and name != SCHEMA:
        raise MovaInputError(f"--render {path}: field 'schema' is {name!r}, this mova-rt reads "
                             f"{SCHEMA} results files: render one written by this version")
    check_results(data, path, SCHEMA)       # every field the table and the chart read
    print_report(data)
    chart = chart or os.path.splitext(path)[0] + ".png"
    check_output_path(chart, suffix=".png")
    result = render_chart(data, chart)
    print(f"wrote {chart}" if result else f"chart skipped: {result.reason}")
    return 0
