"""The validation layer: every input is checked here, before any weight is read, and refused in
one line (MovaInputError: the CLI prints `error: ...` and exits 2) naming the problem and the fix.

One module per kind of input, each built on the same field rules (schema.py):
- flags.py: the command-line flags of every command (numbers finite and in range, device names,
  input paths that are regular files or folders, output paths that cannot touch an input);
- memory.py: whether a clip fits the device, from the memory plan `mova-rt bench --device meta`
  computes;
- configs.py: the JSON files of a checkpoint (model_index.json and each component's config);
- manifests.py: the manifests of engines (`mova-rt build`) and fp8 weights (`mova-rt quantize`);
- results.py: benchmark results files (`mova-rt bench --render`).

Standard library only at import time: torch is imported inside the checks that need it, so
`mova-rt bench --render` stays light.
"""
