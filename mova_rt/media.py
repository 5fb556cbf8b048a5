"""Media input and output for mova-rt: reference image, output mp4 (H.264 + AAC) and latents.

Reading follows the MOVA reference (`crop_and_resize`, then diffusers' `VaeImageProcessor`)
exactly, so the conditioning image is bit-identical. Writing uses PyAV in one pass instead of the
reference's imageio + ffmpeg CLI remux; every file is written under a temporary name in the
destination folder and renamed into place, so a failure never leaves a partial output behind.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image

from .errors import MovaInputError
from .files import check_output_path  # noqa: F401  (re-exported: the CLI checks outputs here)
from .files import ensure_writable_folder, reason_of, remove_quietly, temp_path

# imageio's quality=9 (the reference's setting) maps to libx264 -crf int((1 - 9/10) * 51) = 5, so we
# use crf 5: visually lossless, matching the reference's quality rather than a smaller file.
VIDEO_CRF = 5
AUDIO_BIT_RATE = 192_000


def crop_and_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop `image` to the aspect ratio height:width, then resize to (width, height).

    Same arithmetic as the reference: the crop size is truncated with int(), the offset floors, and
    the resize uses PIL's default resample filter. Returns a PIL image of size (width, height).
    """
    arr = np.asarray(image)
    ih, iw = arr.shape[:2]
    if ih / iw < height / width:
        cw = int(ih / height * width)
        left = (iw - cw) // 2
        arr = arr[:, left : left + cw]
    else:
        ch = int(iw / width * height)
        top = (ih - ch) // 2
        arr = arr[top : top + ch, :]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MovaInputError(
            f"reference image of {iw}x{ih} pixels is too thin to crop to {width}x{height}: "
            "pass --ref_path with an image closer to the output aspect ratio"
        )
    return Image.fromarray(np.ascontiguousarray(arr)).resize((width, height))


def load_reference_image(path: str, height: int, width: int) -> torch.Tensor:
    """Load the first-frame image as the model expects it.

    Returns a float32 tensor of shape [1, 3, height, width] in [-1, 1], identical to diffusers'
    `VideoProcessor.preprocess(crop_and_resize(rgb_image, height, width), height, width)`.
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise MovaInputError(
            f"cannot read reference image {path} ({reason_of(err)}): "
            "pass --ref_path with a PNG or JPEG image"
        ) from None
    return image_to_tensor(crop_and_resize(rgb, height, width))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] float32 in [-1, 1], as diffusers' VaeImageProcessor converts it."""
    arr = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    x = torch.from_numpy(arr.transpose(2, 0, 1)[None])
    return (2.0 * x - 1.0).contiguous()


def white_image(height: int, width: int) -> Image.Image:
    """A pure white RGB image of size (width, height): the reference's text-only first frame."""
    return Image.new("RGB", (width, height), (255, 255, 255))


def _quantize_audio(audio: np.ndarray) -> np.ndarray:
    """float mono [S] -> int16 [S] as the reference's WAV writer: clip, * 32767, truncate.

    NaN becomes 0 (the reference's cast of NaN is undefined); infinities clip like large values.
    """
    a = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(a, -1.0, 1.0) * 32767.0).astype(np.int16)


def _encode(
    tmp: str, frames: np.ndarray, pcm: np.ndarray | None, rate: Fraction, sample_rate: int
) -> None:
    """Mux frames uint8 [F, H, W, 3] and pcm int16 [S] (or None) into the mp4 file `tmp`."""
    num_frames, height, width = frames.shape[:3]
    with av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        vstream = container.add_stream("libx264", rate=rate)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.options = {"crf": str(VIDEO_CRF)}
        astream = None
        if pcm is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
            astream.bit_rate = AUDIO_BIT_RATE
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
        if astream is not None:
            if pcm.size:
                aframe = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
                aframe.sample_rate, aframe.pts = sample_rate, 0
                aframe.time_base = Fraction(1, sample_rate)
                container.mux(astream.encode(aframe))
            container.mux(astream.encode(None))


def write_mp4(
    path: str, frames: np.ndarray, audio: np.ndarray | None, fps: float, sample_rate: int
) -> None:
    """Write an mp4 with H.264 yuv420p video and AAC mono audio (192 kbit/s), moov atom first.

    frames: uint8 [F, H, W, 3] RGB, H and W even. audio: float mono [S] (any range; clipped to
    [-1, 1] and quantized to int16 like the reference) or None for a silent video; it is trimmed to
    the video duration, round(F * sample_rate / fps) samples. fps may be fractional (23.976).
    The file is written under a temporary name in the same folder and renamed to `path`; on any
    failure the temporary file is removed and the error re-raised.
    """
    check_output_path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"frames must be uint8 [F>0, H, W, 3], got {frames.dtype} {list(frames.shape)}"
        )
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise MovaInputError(
            f"video size {width}x{height} is odd and H.264 yuv420p needs even sizes: "
            "pass an even --height and --width"
        )
    if not fps > 0:
        raise MovaInputError(f"frame rate {fps} is not positive: pass a positive --fps")
    rate = Fraction(fps).limit_denominator(1001)
    sample_rate = int(sample_rate)
    pcm = None
    if audio is not None:
        audio = np.asarray(audio)
        if audio.ndim != 1 or sample_rate <= 0:
            raise ValueError(f"audio must be mono [S] at a positive rate, got "
                             f"{list(audio.shape)} at {sample_rate} Hz")
        pcm = _quantize_audio(audio[: round(frames.shape[0] * sample_rate / rate)])
    tmp = temp_path(path, ".mp4")
    try:
        _encode(tmp, frames, pcm, rate, sample_rate)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def probe_mp4(path: str) -> dict:
    """Describe an mp4 by decoding it.

    Returns frames (decoded count), fps, width, height, video_codec, pix_fmt, video_duration (s),
    and audio_codec, audio_sample_rate, audio_channels, audio_duration (s, decoded samples / rate),
    the audio entries being None when there is no audio stream.
    """
    try:
        with av.open(path) as container:
            return _describe(container)
    except (OSError, av.error.FFmpegError) as err:
        raise MovaInputError(
            f"cannot read video {path} ({reason_of(err)}): pass an mp4 file"
        ) from None


def _describe(container) -> dict:
    """probe_mp4's work on an open PyAV input container."""
    if not container.streams.video:
        raise MovaInputError(f"{container.name} has no video stream: pass an mp4 with video")
    vs = container.streams.video[0]
    rate = vs.average_rate or vs.guessed_rate
    info = {
        "frames": sum(1 for _ in container.decode(vs)),
        "fps": float(rate) if rate else None,
        "width": vs.codec_context.width,
        "height": vs.codec_context.height,
        "video_codec": vs.codec_context.name,
        "pix_fmt": vs.codec_context.pix_fmt,
        "audio_codec": None,
        "audio_sample_rate": None,
        "audio_channels": None,
        "audio_duration": None,
    }
    if vs.duration is not None and vs.time_base is not None:
        info["video_duration"] = float(vs.duration * vs.time_base)
    else:
        info["video_duration"] = info["frames"] / info["fps"] if info["fps"] else None
    if container.streams.audio:
        container.seek(0)
        aus = container.streams.audio[0]
        samples = sum(f.samples for f in container.decode(aus))
        info["audio_codec"] = aus.codec_context.name
        info["audio_sample_rate"] = aus.codec_context.sample_rate
        info["audio_channels"] = len(aus.codec_context.layout.channels)
        info["audio_duration"] = samples / aus.codec_context.sample_rate
    return info


def save_latents(
    path: str, video_latents: torch.Tensor, audio_latents: torch.Tensor, metadata: dict[str, str]
) -> None:
    """Save the final latents as a safetensors file with keys "video_latents" and "audio_latents".

    Both tensors are stored as contiguous fp32 CPU tensors in their own shapes (e.g. video
    [1, C, T, h, w], audio [1, C, L]); `metadata` is stored as safetensors string metadata. Written
    under a temporary name and renamed, so no partial file is left on failure.
    """
    from safetensors.torch import save_file

    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata keys and values must all be str")
    ensure_writable_folder(path, "latents file", "pass a latents path in a writable folder")
    tensors = {
        "video_latents": video_latents.detach().to("cpu", torch.float32).contiguous(),
        "audio_latents": audio_latents.detach().to("cpu", torch.float32).contiguous(),
    }
    tmp = temp_path(path, "")
    try:
        save_file(tensors, tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
