"""The human side of a results file: the table on stdout and the PNG chart.

Both read only the JSON structure (suite.py), so `mova-rt bench --render results.json` redraws a
GPU run's results on any machine (the GPU machine has no matplotlib).
"""

from __future__ import annotations

import os

from mova_rt.files import remove_quietly, temp_path


# performance.md: an 8192^3 bf16 matmul on the H100 80 GB of the GPU machine. Only for the floor
# printed beside a plan; measured runs use the ceilings measured in the same run.
H100_BF16_FLOPS = 798e12


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _si(x: float, unit: str) -> str:
    """1.234 P<unit> / 56.7 G<unit>: three significant figures at the right prefix."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {prefix}{unit}"
    return f"{x:.4g} {unit}"


def print_report(data: dict):
    env, s = data["environment"], data["shapes"]
    print(f"mova-rt bench | {env.get('device_name')} ({env['device_type']}) | torch {env['torch']}"
          f" | triton {env.get('triton')} | driver {env.get('driver')} | commit {env['commit']}")
    print(f"preset {data['preset']}: {s['height']}x{s['width']}x{s['num_frames']} @ {s['fps']:g} "
          f"fps | tokens video {s['L_v']}, audio {s['L_a']}, text {s['L_t']}")
    plan = data.get("plan")
    if plan:
        total, counted = plan["flops_formula_total"], plan["flops_counted_total"]
        p = plan["params"]
        print(f"work: {_si(total, 'FLOP')} per forward (formula; FlopCounter on the real code "
              f"{'agrees exactly' if counted == total else 'counts ' + _si(counted, 'FLOP')})"
              f" | params video {_si(p['video_dit'], '')}, audio {_si(p['audio_dit'], '')}, "
              f"bridge {_si(p['dual_tower_bridge'], '')} = {plan['weights_gib']:.3g} GiB bf16")
        ct = plan["flops_counted_towers"]
        print("FLOPs per forward by tower (counted): " + ", ".join(
            f"{k} {_si(v, 'FLOP')}" for k, v in ct.items()) + f"; per step (CFG, 2 forwards) "
            f"{_si(2 * total, 'FLOP')}, at least {2 * total / H100_BF16_FLOPS:.3g} s at an H100's "
            f"measured bf16 matmul rate ({H100_BF16_FLOPS / 1e12:.0f} TFLOP/s)")
        print(f"memory estimate (one forward, fused attention): activations "
              f"{plan['activation_peak_gib']:.3g} GiB, total {plan['vram_estimate_gib']:.3g} GiB")
    c = data.get("ceilings")
    if c:
        parts = [f"{v['what']} {v['value']:.1f} {v['unit']}" for v in c.values()]
        print("ceilings (this run): " + " | ".join(parts))
    if data.get("vram_budget_gib"):
        print(f"VRAM budget: {data['vram_budget_gib']:g} GiB")
    b = data.get("build")
    if b:
        print(f"weights: {b['status']}" + (f", {b['weights_gib']:.2f} GiB from {b['source']} in "
                                          f"{b['seconds']:.1f} s" if b["status"] == "ok"
                                          else f": {b['message']}"))
    if data.get("configs"):
        _config_table(data["configs"])
    if data.get("cold_start"):
        _cold_start_table(data["cold_start"])
    if data.get("ops"):
        _ops_table(data["ops"])
    if data.get("stages"):
        print("stages (outside the steps):")
        for name, r in data["stages"].items():
            print(f"  {name:<13} " + (f"{r['median_s']:.3f} s [{r['min_s']:.3f}-{r['max_s']:.3f}]"
                                      if r["status"] == "ok" else f"{r['status']}: {r['message']}"))


def _config_table(rows: list[dict]):
    head = (f"{'config':<14}{'step s: median [min-max]':<28}{'x first':>8}{'TFLOP/s':>9}"
            f"{'%mm':>6}  {'per forward ms: video/audio/bridge/rest':<42}{'VRAM alloc/dev GiB':>19}"
            f"{'RSS GiB':>9}  status")
    print(head)
    for r in rows:
        if "step_s" not in r:
            print(f"{r['name']:<14}{'-':<28}{'-':>8}{'-':>9}{'-':>6}  {'-':<42}{'-':>19}{'-':>9}  "
                  f"{r['status']}: {r.get('message', '')}")
            continue
        st = r["step_s"]
        t = r.get("towers_s_per_forward") or {}
        towers = "/".join(_fmt(t.get(k, None) and t[k] * 1e3, ".1f")
                          for k in ("video_blocks", "audio_blocks", "bridge", "rest"))
        mm = r.get("fraction_of_matmul_ceiling")
        print(f"{r['name']:<14}{st['median']:.3f} [{st['min']:.3f}-{st['max']:.3f}]".ljust(42)
              + f"{_fmt(r.get('ratio_to_first'), '.3f'):>8}{r['tflops']:>9.1f}"
              f"{_fmt(mm and 100 * mm, '.0f'):>6}  {towers:<42}"
              f"{r['peak_vram_allocated_gib']:>9.2f}/{r['peak_vram_device_gib']:<9.2f}"
              f"{r['peak_rss_gib']:>9.2f}  {r['status']}" + (f" ({r['message']})"
                                                            if r.get("message") else ""))


def _cold_start_table(c: dict):
    read = c["disk_read"]
    print(f"cold start ({c['precision']}, {c['steps']} steps per process): weights "
          f"{read['bytes'] / 1e9:.2f} GB, read once in {read['seconds']:.2f} s = "
          f"{_fmt(read['gb_per_s'])} GB/s (page cache "
          f"{'dropped' if read['page_cache_dropped'] else 'NOT dropped: a warm-cache read'})")
    print(f"{'mode':<14}{'to 1st step s':>14}{'import s':>10}{'load s':>9}{'text+vae s':>11}"
          f"{'1st step s':>11}{'later step s':>13}{'vs weights read':>16}")
    bound = c.get("weights_read_bound_s")
    for r in c["modes"]:
        if r["status"] != "ok":
            print(f"{r['mode']:<14}{r['status']}: {r.get('message', '')}")
            continue
        ratio = r["process_to_first_step_s"] / bound if bound else None
        print(f"{r['mode']:<14}{r['process_to_first_step_s']:>14.2f}{r['import_s']:>10.2f}"
              f"{r['load_s']:>9.2f}{r['text_and_vae_s']:>11.2f}{r['first_step_s']:>11.3f}"
              f"{_fmt(r['later_step_median_s'], '.3f'):>13}{_fmt(ratio, '.2f') + 'x':>16}")


def _ops_table(rows: list[dict]):
    print(f"{'op':<26}{'backend':<16}{'ms: median [min-max]':<30}{'rate':>16}{'of ceiling':>11}"
          f"  shape")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['op']:<26}{r['backend']:<16}{r['status']}: {r['message']}")
            continue
        timing = f"{r['median_ms']:.3f} [{r['min_ms']:.3f}-{r['max_ms']:.3f}]"
        print(f"{r['op']:<26}{r['backend']:<16}{timing:<30}{r['rate']:>9.1f} {r['unit']:<7}"
              f"{100 * r['fraction_of_ceiling']:>10.0f}%  {r['shape']}")


class ChartResult:
    def __init__(self, ok: bool, reason: str = ""):
        self.ok, self.reason = ok, reason

    def __bool__(self):
        return self.ok


def render_chart(data: dict, path: str) -> ChartResult:
    """Step time (median with min-max whiskers) and peak memory per configuration."""
    rows = [r for r in data.get("configs") or [] if "step_s" in r]
    if not rows:
        return ChartResult(False, "no configuration has step times")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ChartResult(False, "matplotlib is not installed (pip install mova-rt[bench]); "
                                  "render later with mova-rt bench --render <json>")
    names = [r["name"] for r in rows]
    med = [r["step_s"]["median"] for r in rows]
    err = [[m - r["step_s"]["min"] for m, r in zip(med, rows)],
           [r["step_s"]["max"] - m for m, r in zip(med, rows)]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    ax1.bar(x, med, yerr=err, capsize=4, color="#4c72b0")
    ax1.set_xticks(list(x), names, rotation=20)
    ax1.set_ylabel("seconds per denoising step")
    ax1.set_title("step time (median, min-max)")
    for i, r in enumerate(rows):
        ax1.annotate(f"{r['tflops']:.3g} TFLOP/s", (i, med[i] / 2), ha="center", va="center",
                     fontsize=8, color="white")
    w = 0.4
    ax2.bar([i - w / 2 for i in x], [r["peak_vram_allocated_gib"] for r in rows], w,
            label="allocator peak")
    ax2.bar([i + w / 2 for i in x], [r["peak_vram_device_gib"] for r in rows], w,
            label="device (driver)")
    ax2.bar(x, [r["peak_rss_gib"] for r in rows], 0.15, label="host RSS", color="#999999")
    ax2.set_xticks(list(x), names, rotation=20)
    ax2.set_ylabel("GiB")
    ax2.set_title("peak memory")
    ax2.legend(fontsize=8)
    env, s = data["environment"], data["shapes"]
    fig.suptitle(f"mova-rt bench {data['preset']} {s['height']}x{s['width']}x{s['num_frames']} | "
                 f"{env.get('device_name')} | {env['commit'][:12]}", fontsize=10)
    fig.tight_layout()
    tmp = temp_path(path, ".png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        remove_quietly(tmp)
    return ChartResult(True)
