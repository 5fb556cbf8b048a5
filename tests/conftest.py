import os

# Triton kernels run through the interpreter on CPU machines; this must be set before any kernel
# module is imported (see ../shared/docs/environment.md).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
