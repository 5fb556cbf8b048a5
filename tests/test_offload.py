"""Offload: layerwise streaming and component residency equal the all-resident run bit for bit
(on the CPU the copy stream is a plain copy), prefetching follows the execution order, and the
VRAM-budget plan picks the least offload that fits."""
import pytest
import torch

from mova_rt.config import preset_config
from mova_rt.offload import (BlockStreamer, choose_plan, component_weights, plan_estimates)
from mova_rt.pipeline import MovaPipeline

KW = dict(height=64, width=96, num_frames=17, progress=False, num_inference_steps=5, seed=4)


@pytest.fixture(scope="module")
def exact(tiny_ckpt):
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16")
    return {b: pipe("a train passes", cfg_batch=b, **KW) for b in (False, True)}


@pytest.mark.parametrize("mode, depth", [("group", 1), ("group", 3), ("cpu", 1)])
@pytest.mark.parametrize("batch", [False, True])
def test_offload_equals_all_resident(tiny_ckpt, exact, mode, depth, batch):
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", offload=mode, offload_depth=depth)
    out = pipe("a train passes", cfg_batch=batch, **KW)
    assert torch.equal(out.video_latents, exact[batch].video_latents)
    assert torch.equal(out.audio_latents, exact[batch].audio_latents)
    assert (out.frames == exact[batch].frames).all()


def test_batched_guidance_loads_each_block_once_per_step(tiny_ckpt):
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", offload="group")
    s = pipe.streamer
    cfg = pipe.cfg
    per_forward = (cfg.video_dit.num_layers + cfg.audio_dit.num_layers
                   + 2 * len(cfg.bridge.interaction_layers()))
    text_blocks = len(pipe.text_encoder.model.encoder.block)
    # Beyond one load per block per forward: at most each text block twice (two prompts) and
    # the prefetches that follow the other expert's order once, at the switch and at the start
    # of the next request.
    slack = 2 * text_blocks + 2 * cfg.video_dit.num_layers
    # The text K/V, computed once per request for each text set: both experts' video blocks and
    # the audio blocks are bound once for it.
    kv = 2 * cfg.video_dit.num_layers + cfg.audio_dit.num_layers
    pipe("x", cfg_batch=True, **KW)
    assert 5 * per_forward + kv <= s.loads <= 5 * per_forward + kv + slack   # 1 forward a step
    s.loads = 0
    pipe("x", cfg_batch=False, **KW)
    assert 10 * per_forward <= s.loads <= 10 * per_forward + 2 * kv + slack  # 2 passes a step
    # Device memory: the slots only (depth + 1 blocks), not the streamed weights.
    assert s.device_bytes == 2 * s.slot_bytes < s.host_bytes


def test_streamer_prefetches_in_the_order_blocks_ran():
    blocks = [torch.nn.Linear(4, 4) for _ in range(5)]
    s = BlockStreamer(blocks, "cpu", depth=2)
    x = torch.randn(2, 4)
    order = [3, 1, 4, 0, 2]
    want = x
    for i in order:
        want = blocks[i](want)
    for _ in range(2):                                        # the 2nd run prefetches
        y = x
        for i in order:
            y = blocks[i](y)
    assert torch.equal(y, want)
    assert s.order == [blocks[i] for i in order]
    # After block 3 runs, the next two in the recorded order (1, 4) are in slots.
    s.loads = 0
    blocks[3](x)
    held = {slot.block for slot in s.slots}
    assert blocks[1] in held and blocks[4] in held and s.loads == 2
    assert all(p.device.type == "cpu" for b in blocks for p in b.parameters())


def test_budget_picks_the_least_offload_that_fits():
    est = plan_estimates(component_weights(preset_config("mova-360p")), activation_gib=7.0,
                         batch=1)
    # All-resident > one expert + audio + bridge > streamed blocks.
    assert est["none"] > est["cpu"] > est["group"]
    assert est["none"] > 70 and 65 < est["cpu"] < 80 and est["group"] < 20
    assert choose_plan(est, 141) == "none"
    assert choose_plan(est, 80) == "cpu"
    assert choose_plan(est, 48) == "group"
    assert choose_plan(est, 24) == "group"
    assert choose_plan(est, 4) is None


def test_out_of_memory_advice_names_a_budget_that_fits(tiny_ckpt):
    from types import SimpleNamespace

    from mova_rt.cli import _estimates, _oom_advice
    args = SimpleNamespace(height=64, width=96, num_frames=17, fps=24.0, cfg_scale=5.0,
                           bridge_cfg_scale=1.0, cfg_batch=None, kernels="reference")
    est = _estimates(args, tiny_ckpt)
    assert est["none"] > est["cpu"] > est["group"] > 0
    line = _oom_advice(args, tiny_ckpt, total=80.0, offload="none")
    assert line.startswith("out of GPU memory with --offload none on this 80 GiB GPU")
    assert "pass --vram-budget 80 to pick --offload none" in line and "\n" not in line
    line = _oom_advice(args, tiny_ckpt, total=0.6005, offload="group")
    assert "make the clip smaller" in line


@pytest.mark.parametrize("batch", [False, True])
def test_stream_from_disk_equals_all_resident_and_holds_no_block_in_ram(tiny_ckpt, exact, batch):
    pipe = MovaPipeline.from_pretrained(tiny_ckpt, dtype="bf16", offload="group",
                                        stream_from_disk=True)
    s = pipe.streamer
    assert s.host_bytes == 0 and len(s.disk_blocks) == len(s.blocks)
    out = pipe("a train passes", cfg_batch=batch, **KW)
    assert torch.equal(out.video_latents, exact[batch].video_latents)
    assert torch.equal(out.audio_latents, exact[batch].audio_latents)
    # Between uses a streamed parameter holds nothing.
    assert all(p.numel() == 0 for b in s.blocks for p in b.parameters())


def test_stream_from_disk_refusals(tiny_ckpt):
    from mova_rt.errors import MovaInputError
    with pytest.raises(MovaInputError, match="needs --offload group"):
        MovaPipeline.from_pretrained(tiny_ckpt, offload="cpu", stream_from_disk=True)
    with pytest.raises(MovaInputError, match="stored"):          # fp32 run, bf16 on disk
        MovaPipeline.from_pretrained(tiny_ckpt, dtype="fp32", offload="group",
                                     stream_from_disk=True)


def test_streamer_is_dtype_agnostic_fp8_weights_stream_as_bytes():
    """The fp8 path's weights (float8_e4m3fn) stream like any other: bytes in, same bytes bound."""
    lin = torch.nn.Linear(16, 32, bias=True)
    w8 = (torch.randn(32, 16) * 0.5).to(torch.float8_e4m3fn)
    lin.weight = torch.nn.Parameter(w8, requires_grad=False)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    s = BlockStreamer([lin], "cpu", depth=1)
    seen = {}
    lin.register_forward_pre_hook(lambda m, a: seen.update(w=m.weight.detach().clone(),
                                                           b=m.bias.detach().clone()))
    with pytest.raises(RuntimeError):     # an fp8 Linear cannot run eagerly; binding is the test
        lin(torch.randn(2, 16))
    assert seen["w"].dtype == torch.float8_e4m3fn
    assert torch.equal(seen["w"].view(torch.uint8), ref_w.view(torch.uint8))
    assert torch.equal(seen["b"], ref_b) and s.loads == 1
