"""What a benchmark results file (`mova-rt bench`, schema mova-rt-bench/1) must hold for
`mova-rt bench --render` to redraw it: every field the table and the chart read, with its type.

A results file travels between machines (written on the GPU machine, rendered elsewhere): one
with the right schema name but a field missing or of the wrong type is refused naming the field,
instead of failing half-way through the table.
"""

from __future__ import annotations

from .schema import Any, Bool, Int, List, MapOf, Nullable, Obj, Real, Str, check

NUM = Real()
OPT_NUM = Nullable(Real())
TEXT = Str(max_len=1 << 16)
MESSAGE = Nullable(TEXT)
SPREAD = Obj({"median": NUM, "min": NUM, "max": NUM}, required=("median", "min", "max"))


def _ok(fields):
    """Fields a row needs when its status is ok (the others carry a message instead)."""
    return lambda row: fields if row.get("status") == "ok" else ()


CONFIG_ROW = Obj({
    "name": TEXT, "status": TEXT, "message": MESSAGE, "step_s": SPREAD, "tflops": NUM,
    "towers_s_per_forward": Nullable(MapOf(OPT_NUM)), "fraction_of_matmul_ceiling": OPT_NUM,
    "ratio_to_first": OPT_NUM, "peak_vram_allocated_gib": NUM, "peak_vram_device_gib": NUM,
    "peak_rss_gib": NUM,
}, required=("name", "status"),
   when=lambda row: ("tflops", "peak_vram_allocated_gib", "peak_vram_device_gib",
                     "peak_rss_gib") if "step_s" in row else ())

COLD_ROW = Obj({
    "mode": TEXT, "status": TEXT, "message": MESSAGE, "process_to_first_step_s": NUM,
    "import_s": NUM, "load_s": NUM, "text_and_vae_s": NUM, "first_step_s": NUM,
    "later_step_median_s": OPT_NUM,
}, required=("mode", "status"),
   when=_ok(("process_to_first_step_s", "import_s", "load_s", "text_and_vae_s", "first_step_s",
             "later_step_median_s")))

OP_ROW = Obj({
    "op": TEXT, "backend": TEXT, "status": TEXT, "message": MESSAGE, "median_ms": NUM,
    "min_ms": NUM, "max_ms": NUM, "rate": NUM, "unit": TEXT, "fraction_of_ceiling": NUM,
    "shape": Any(),
}, required=("op", "backend", "status"),
   when=lambda row: ("median_ms", "min_ms", "max_ms", "rate", "unit", "fraction_of_ceiling",
                     "shape") if row.get("status") == "ok" else ("message",))

STAGE = Obj({"status": TEXT, "message": MESSAGE, "median_s": NUM, "min_s": NUM, "max_s": NUM},
            required=("status",),
            when=lambda row: ("median_s", "min_s", "max_s") if row.get("status") == "ok"
            else ("message",))

def results_rule(schema: str) -> Obj:
    return Obj({
        "schema": Str((schema,)), "preset": TEXT,
        "environment": Obj({"device_type": TEXT, "torch": TEXT, "commit": TEXT,
                            "device_name": Nullable(TEXT), "triton": Nullable(TEXT),
                            "driver": Nullable(TEXT)},
                           required=("device_type", "torch", "commit")),
        "shapes": Obj({"height": Int(1), "width": Int(1), "num_frames": Int(1), "fps": NUM,
                       "L_v": Int(0), "L_a": Int(0), "L_t": Int(0)},
                      required=("height", "width", "num_frames", "fps", "L_v", "L_a", "L_t")),
        "plan": Nullable(Obj({
            "flops_formula_total": NUM, "flops_counted_total": NUM,
            "params": Obj({"video_dit": NUM, "audio_dit": NUM, "dual_tower_bridge": NUM},
                          required=("video_dit", "audio_dit", "dual_tower_bridge")),
            "weights_gib": NUM, "flops_counted_towers": MapOf(NUM), "activation_peak_gib": NUM,
            "vram_estimate_gib": NUM},
            required=("flops_formula_total", "flops_counted_total", "params", "weights_gib",
                      "flops_counted_towers", "activation_peak_gib", "vram_estimate_gib"))),
        "ceilings": Nullable(MapOf(Obj({"what": TEXT, "value": NUM, "unit": TEXT},
                                       required=("what", "value", "unit")))),
        "vram_budget_gib": OPT_NUM,
        "build": Nullable(Obj({"status": TEXT, "weights_gib": NUM, "source": TEXT, "seconds": NUM,
                               "message": MESSAGE}, required=("status",),
                              when=lambda b: ("weights_gib", "source", "seconds")
                              if b.get("status") == "ok" else ("message",))),
        "configs": Nullable(List(CONFIG_ROW)),
        "cold_start": Nullable(Obj({
            "precision": TEXT, "steps": Int(0),
            "disk_read": Obj({"bytes": NUM, "seconds": NUM, "gb_per_s": OPT_NUM,
                              "page_cache_dropped": Bool()},
                             required=("bytes", "seconds", "gb_per_s", "page_cache_dropped")),
            "weights_read_bound_s": OPT_NUM, "modes": List(COLD_ROW)},
            required=("precision", "steps", "disk_read", "modes"))),
        "ops": Nullable(List(OP_ROW)),
        "stages": Nullable(MapOf(STAGE)),
    }, required=("schema", "environment", "preset", "shapes"))


def check_results(data, path: str, schema: str) -> None:
    """Every field of the results file `path` (of `schema`) that the table and the chart read."""
    check(data, results_rule(schema), f"--render {path}",
          "the results file is damaged or was edited; render the file the benchmark wrote, or "
          "run `mova-rt bench` again")
