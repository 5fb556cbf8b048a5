"""Helpers shared by the test files (not tests themselves)."""
import json
import os
import subprocess
import sys


def triton_compile_report(module: str, archs=(90, 89), details: bool = False, jobs: int = 1,
                          toolkit_ptxas=()) -> list:
    """kernels/_triton.compile_report for `module`'s COMPILE_CASES, in a subprocess without
    TRITON_INTERPRET (under the interpreter @triton.jit functions cannot be compiled)."""
    code = ("import json; from mova_rt.kernels._triton import compile_report; "
            f"print(json.dumps(compile_report({module!r}, {list(archs)!r}, {details!r}, {jobs!r}, "
            f"{tuple(toolkit_ptxas)!r})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def autograd_leaks(obj, name: str = "", depth: int = 0) -> list:
    """Names of the tensors reachable from `obj` (modules' parameters and buffers, and tensors in
    dicts, lists, tuples, dataclasses and plain objects' attributes, a few levels deep) that
    require grad or carry a grad_fn: what an inference runtime must never hold."""
    import dataclasses

    import torch
    import torch.nn as nn

    if depth > 6:
        return []
    if isinstance(obj, torch.Tensor):
        return [name] if obj.requires_grad or obj.grad_fn is not None else []
    if isinstance(obj, nn.Module):
        return [f"{name}.{n}" for n, t in (*obj.named_parameters(), *obj.named_buffers())
                if t.requires_grad or t.grad_fn is not None]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).items()
    else:
        return []
    out = []
    for k, v in items:
        out += autograd_leaks(v, f"{name}.{k}" if name else str(k), depth + 1)
    return out


def refused(capsys, argv: list) -> str:
    """Runs `mova-rt ARGV` in this process and checks the promise for bad input: exit code 2,
    exactly one `error:` line on stderr, no traceback. Returns that line."""
    from mova_rt.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    return errors[0]


def check_hopper_properties(rows: list, loop_kernel: str, wgmma: str, elt: int = 2) -> list:
    """The compile-check rows (kernels/_triton.compile_report with details) of an attention
    module: shared memory within the SM, no spills, stack or local memory, no integer division
    anywhere; for the key-loop kernels (names starting with `loop_kernel`) `wgmma` tensor-core
    instructions in the loop, no mma.sync, no division there, shared memory under the prune
    predicate's estimate. Returns (row, block_m, block_n, head_dim) of the loop kernels."""
    from mova_rt.kernels.attention import shared_bytes
    loops = []
    for r in rows:
        print(f"{r['name']:44s} regs {r['registers']:3d} shared {r['shared']:6d} "
              f"wgmma/loop {r['loop_wgmma_count']}")
        assert r["shared"] <= r["limit"], r
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, r
        assert r["local_insts"] == 0 and r["int_div"] == 0, r
        if r["name"].startswith(loop_kernel):
            assert r["loop_found"] and r["loop_wgmma"] == [wgmma], r
            assert r["loop_mma_sync"] == 0 and r["loop_float_div"] == 0, r
            name = r["name"].split()
            bm, bn = (int(x) for x in name[3].split("x"))
            d, stages = int(name[1][2:]), int(name[5][1:])
            assert r["shared"] <= shared_bytes(bm, bn, d, stages, elt=elt), r
            loops.append((r, bm, bn, d))
    return loops
