"""Stage 1b — video frames: a video file (or a list of frames) -> resized uint8 frames for processor.py.

Input: a path (decord reads it; PyAV where decord is missing or asked for) or a list of PIL / numpy frames.
Output: Video(frames (T, 3, H, W) uint8 with H, W multiples of 28 and T even, sampled indices, sample fps).
Sampling and sizing follow qwen-vl-utils 0.0.8, the Qwen2-VL era (REFERENCE 4.1).
"""
import math
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_MIN_PIXELS = 128 * 28 * 28        # 100,352
VIDEO_MAX_PIXELS = 768 * 28 * 28        # 602,112
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28    # 19,267,584 (qwen-vl-utils 0.0.8)
FPS, FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 2, 4, 768


class Video(NamedTuple):
    frames: torch.Tensor   # (T, 3, H, W) uint8, H and W multiples of 28, T even
    indices: list[int]     # the sampled frame indices in the source
    fps: float             # effective sampling fps = nframes / total_frames * video_fps


def round_by_factor(n, f): return round(n / f) * f    # Python round: banker's, as qwen-vl-utils
def ceil_by_factor(n, f): return math.ceil(n / f) * f
def floor_by_factor(n, f): return math.floor(n / f) * f


def sample_indices(total_frames, video_fps, fps=FPS, nframes=None, min_frames=FPS_MIN_FRAMES,
                   max_frames=FPS_MAX_FRAMES) -> list[int]:
    """How many frames to keep (an even number, ~`fps` per second) and which: evenly spaced, ends included."""
    if nframes is not None:
        n = round_by_factor(nframes, FRAME_FACTOR)
    else:
        min_f = ceil_by_factor(min_frames, FRAME_FACTOR)
        max_f = floor_by_factor(min(max_frames, total_frames), FRAME_FACTOR)
        n = round_by_factor(min(max(total_frames / video_fps * fps, min_f), max_f), FRAME_FACTOR)
    if not 2 <= n <= total_frames:
        raise ValueError(f"{n} frames requested from {total_frames} frames at {video_fps:g} fps; need "
                         f"2 <= frames <= {total_frames}: pass a smaller nframes or a longer video")
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def frame_pixels(nframes, min_pixels=VIDEO_MIN_PIXELS, total_pixels=VIDEO_TOTAL_PIXELS) -> float:
    """Per-frame pixel cap: share `total_pixels` over nframes/2 temporal patches, within [min*1.05, VIDEO_MAX]."""
    return max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))


def resize_frames(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """What torchvision's tensor resize(BICUBIC, antialias=True) does; uint8 (T, 3, H, W) -> (T, 3, h, w)."""
    if frames.shape[-2:] == (h, w):
        return frames
    # 16 frames at a time: 768 float frames at 1080p would need ~19 GB at once.
    return torch.cat([F.interpolate(c.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
                      .round().clamp(0, 255).to(torch.uint8) for c in frames.split(16)])


def _open(path: str, backend: str):
    """Open the file -> (handle, total_frames, video_fps). Runs in a worker thread (see _with_timeout)."""
    if backend == "decord":
        import decord
        vr = decord.VideoReader(path, ctx=decord.cpu(0))
        return vr, len(vr), float(vr.get_avg_fps())
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps, total = float(stream.average_rate or 0), stream.frames
        if total == 0:                         # some containers do not store the count: count by decoding
            total = sum(1 for _ in container.decode(stream))
    return path, total, fps


def _decode(handle, idx: list[int]) -> np.ndarray:
    """The frames at `idx` -> (T, H, W, 3) uint8. Runs in a worker thread."""
    if not isinstance(handle, str):            # a decord VideoReader
        return handle.get_batch(idx).asnumpy()
    import av
    wanted, got = set(idx), {}
    with av.open(handle) as container:
        container.streams.video[0].thread_type = "AUTO"       # threaded decoding: faster, same frames
        for i, frame in enumerate(container.decode(video=0)):  # sequential: index i = decord's frame i
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if len(got) == len(wanted):
                break
    if len(got) < len(wanted):
        raise RuntimeError(f"the stream ended before frame {min(wanted - got.keys())}")
    return np.stack([got[i] for i in idx])


def _with_timeout(fn, timeout, path, *args):
    """fn(*args) in a daemon thread: a hung decoder costs `timeout` s, and never blocks interpreter exit."""
    out = {}

    def work():
        try:
            out["value"] = fn(*args)
        except Exception as e:                 # any decoder failure (DECORDError, av.error.*, OSError, ...)
            out["error"] = e
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise ValueError(f"video {path}: decoding did not finish within {timeout} s; check the file plays, "
                         "re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or pass a larger timeout")
    if "error" in out:
        raise ValueError(f"video {path}: cannot be decoded as a video ({type(out['error']).__name__}: "
                         f"{out['error']}); pass a valid video file (e.g. H.264 mp4)") from out["error"]
    return out["value"]


def _pick_backend(backend):
    """decord unless PyAV is asked for, or decord is missing (e.g. Apple silicon: no decord wheel)."""
    if backend not in (None, "decord", "av"):
        raise ValueError(f"video backend {backend!r}: expected None, 'decord' or 'av'")
    try:
        import decord  # noqa: F401
    except ImportError:
        if backend == "decord":
            raise ValueError("video backend 'decord' is not installed; pip install decord, "
                             "or pass backend='av' (PyAV)") from None
        return "av"
    return backend or "decord"


def read_video(source, fps=FPS, nframes=None, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES,
               min_pixels=VIDEO_MIN_PIXELS, max_pixels=None, total_pixels=VIDEO_TOTAL_PIXELS,
               backend=None, timeout=120.0) -> Video:
    """A video path or a list of frames -> Video(frames (T, 3, H, W) uint8, indices, fps)."""
    from .processor import load_image, smart_resize   # here, not at the top: processor imports this module

    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("video given as an empty list of frames; pass at least one frame")
        idx = list(range(len(source))) + [len(source) - 1] * (len(source) % 2)   # pad to an even count
        images = [load_image(source[i]) for i in idx]                         # RGB PIL images
        (W, H), n, name, sample_fps = images[0].size, len(idx), "given as a list of frames", float(fps)
        frames = [torch.from_numpy(np.array(im)) for im in images]   # T x (H_i, W_i, 3): sizes may differ
    else:
        path = name = str(source)
        if not Path(path).is_file():
            raise ValueError(f"video {path}: file not found; check the path")
        kind = _pick_backend(backend)
        handle, total, video_fps = _with_timeout(_open, timeout, path, path, kind)
        if total < 2:
            raise ValueError(f"video {path}: has {total} frame(s), a video needs at least 2; "
                             "pass a single frame as an image instead")
        if not (video_fps > 0 and math.isfinite(video_fps)):
            raise ValueError(f"video {path}: frame rate is {video_fps} (unknown); re-encode it with a fixed "
                             "fps (e.g. ffmpeg -i in.mp4 -r 30 out.mp4) or pass the frames as a list")
        try:
            idx = sample_indices(total, video_fps, fps, nframes, min_frames, max_frames)
        except ValueError as e:
            raise ValueError(f"video {path}: {e}") from None
        n, sample_fps = len(idx), len(idx) / total * video_fps     # the fps the model's time axis sees
        frames = torch.from_numpy(_with_timeout(_decode, timeout, path, handle, idx))   # (T, H, W, 3)
        H, W = frames.shape[1:3]
    per_frame_max = frame_pixels(n, min_pixels, total_pixels) if max_pixels is None else max_pixels
    try:
        h, w = smart_resize(H, W, 28, min_pixels=min_pixels, max_pixels=per_frame_max)
    except ValueError as e:
        raise ValueError(f"video {name}: {e}") from None
    if isinstance(frames, list):   # (H_i, W_i, 3) -> (1, 3, H_i, W_i) -> resized, then T x -> (T, 3, h, w)
        frames = torch.cat([resize_frames(f.permute(2, 0, 1)[None], h, w) for f in frames])
    else:                          # (T, H, W, 3) -> (T, 3, H, W) -> (T, 3, h, w)
        frames = resize_frames(frames.permute(0, 3, 1, 2), h, w)
    return Video(frames.contiguous(), idx, float(sample_fps))
