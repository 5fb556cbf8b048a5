"""setup.py's bounds hold the library versions parity was verified with, and `mova-rt info` says
which versions are installed and whether parity was verified with them."""

import os
import re

from packaging.specifiers import SpecifierSet

from mova_rt import versions
from mova_rt.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_requires() -> dict:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as fh:
        text = fh.read()
    block = text[text.index("install_requires=["):]
    block = block[: block.index("]")]
    out = {}
    for req in re.findall(r'"([^"]+)"', block):
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        out[name] = SpecifierSet(req[len(name):])
    return out


def test_setup_bounds_hold_the_verified_versions():
    reqs = _install_requires()
    assert "transformers" not in reqs  # not used by mova-rt (its own UMT5 and tokenizer reading)
    for name, verified in versions.VERIFIED.items():
        spec = reqs[name]
        assert spec, f"{name} has no bounds in setup.py"
        assert all(v in spec for v in verified), (name, str(spec), verified)
        assert versions.REFERENCE[name] in verified, name
        assert versions.installed(name) in spec, (name, versions.installed(name), str(spec))


def test_info_prints_library_versions_and_parity_status(capsys, monkeypatch):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("transformers", "diffusers", "tokenizers"):
        line = next(l for l in out.splitlines() if l.startswith(f"{name}: "))
        assert str(versions.installed(name) or "not installed") in line
    diffusers = next(l for l in out.splitlines() if l.startswith("diffusers: "))
    assert ("parity with the reference verified" in diffusers) == (versions.installed("diffusers") in
                                                                  versions.VERIFIED["diffusers"])
    monkeypatch.setattr(versions, "installed", lambda name: "0.99.0")
    lines = versions.library_lines()
    assert any("diffusers: 0.99.0" in l and "parity not verified" in l and "0.36.0" in l for l in lines)
