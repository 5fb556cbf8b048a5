"""The library versions mova-rt's exact path was compared with the reference implementation under
(docs/parity.md, "Library versions"), and what `mova-rt info` says about the installed ones.

Keep in step with setup.py's bounds (tests/test_versions.py checks that every version listed here
is inside them) and with docs/parity.md.
"""

from __future__ import annotations

from importlib import metadata

# What the reference (OpenMOSS/MOVA 595a976) ran with in the comparison.
REFERENCE = {"transformers": "4.57.6", "diffusers": "0.36.0", "tokenizers": "0.22.2"}

# Installed versions under which mova-rt's exact path reproduced the reference end to end.
VERIFIED = {"diffusers": ("0.36.0", "0.42.1"), "tokenizers": ("0.22.2", "0.23.3")}

# Why each library matters to the exact path.
ROLE = {
    "transformers": "not used: mova-rt computes UMT5 itself (the reference's eager formula)",
    "diffusers": "Wan video VAE (its RMS norms are mova-rt's, as diffusers 0.36 computes them)",
    "tokenizers": "reads the checkpoint's tokenizer.json as written",
}


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_lines() -> list[str]:
    """One line per library: installed version, its role, and whether parity was verified with it."""
    lines = []
    for name, role in ROLE.items():
        version = installed(name)
        if name not in VERIFIED:
            status = f"any version (the reference used {REFERENCE[name]})"
        elif version in VERIFIED[name]:
            status = "parity with the reference verified with this version"
        else:
            status = f"parity not verified with this version (verified: {', '.join(VERIFIED[name])})"
        lines.append(f"{name}: {version or 'not installed'} | {role} | {status}")
    return lines
