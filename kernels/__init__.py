"""Triton kernels of mova-rt, imported as `mova_rt.kernels`. Each op gets its own file with a
pure-PyTorch reference beside it (see ../shared/docs/style.md); none has landed yet."""
