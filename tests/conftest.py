import os

# Triton kernels run through the interpreter on CPU machines; this must be set before any kernel
# module is imported (see ../shared/docs/environment.md).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


def pytest_configure(config):
    # The Triton 3.6 interpreter converts loop bounds with a NumPy call deprecated in 1.25: noise
    # from its internals, once per loop iteration.
    config.addinivalue_line("filterwarnings",
                            "ignore::DeprecationWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny checkpoint in the official layout, written once per session (read-only use)."""
    from mova_rt.checkpoint import make_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint("tiny", str(path), seed=0)
    return str(path)


@pytest.fixture
def tiny_copy(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    dst = tmp_path / "tiny"
    shutil.copytree(tiny_ckpt, dst)
    return str(dst)


@pytest.fixture(scope="session")
def tiny_pipe_fp32(tiny_ckpt):
    from mova_rt.pipeline import MovaPipeline

    return MovaPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32")
