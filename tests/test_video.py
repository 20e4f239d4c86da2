"""Stage 1b tests: qwen-vl-utils 0.0.8 sampling arithmetic, decord / PyAV parity, content, errors.

Clips are written here with PyAV (libx264). Each frame shows its own number in binary as 9 bright
blocks (plus a moving bar), so a decoded, resized frame tells us which source frame it was.
"""
import sys
import time

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_min import video
from qwen2vl_min.processor import smart_resize
from qwen2vl_min.video import frame_pixels, read_video, sample_indices

BITS, W, H = 9, 640, 360


def draw_frame(i, w=W, h=H):
    a = np.full((h, w, 3), 40, np.uint8)
    for b in range(BITS):                      # bit b of i: a 56-px wide block, bright if set
        if i >> b & 1:
            a[h // 3: 2 * h // 3, 32 + 64 * b: 88 + 64 * b] = 230
    x = (i * 7) % (w - 8)
    a[: h // 6, x: x + 8] = 255               # the moving bar
    return a


def make_clip(path, n, rate=30, faststart=False):
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"preset": "veryfast"}
        for i in range(n):
            c.mux(s.encode(av.VideoFrame.from_ndarray(draw_frame(i), format="rgb24")))
        c.mux(s.encode())
    return path


def frame_number(frame):
    """(3, h, w) uint8 resized frame -> the number drawn on it (block centres scale with the resize)."""
    _, h, w = frame.shape
    y = round(h / 2)
    bits = [frame[0, y - 3: y + 3, round((60 + 64 * b) * w / W) - 3: round((60 + 64 * b) * w / W) + 3]
            .float().mean() > 135 for b in range(BITS)]
    return sum(int(bit) << b for b, bit in enumerate(bits))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    ten = make_clip(d / "ten_s.mp4", 300, faststart=True)   # moov first: a truncated copy still opens
    data = ten.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "clip.mp4").write_text("this is not a video\n")
    (d / "empty.mp4").write_bytes(b"")
    return {"ten": ten, "two": make_clip(d / "two_s.mp4", 60), "one": make_clip(d / "one.mp4", 1),
            "truncated": d / "truncated.mp4", "text": d / "clip.mp4", "zero": d / "empty.mp4",
            "missing": d / "missing.mp4"}


# ---- pure arithmetic (qwen-vl-utils 0.0.8) ------------------------------------------------------

def test_sample_indices_counts():
    idx = sample_indices(300, 30.0)                         # 10 s @ 30 fps -> 20 frames at 2 fps
    assert len(idx) == 20 and idx[:4] == [0, 16, 31, 47] and idx[-1] == 299
    assert idx == torch.linspace(0, 299, 20).round().long().tolist()
    assert sample_indices(60, 30.0) == [0, 20, 39, 59]      # 2 s -> 4 (the minimum)
    assert len(sample_indices(1800, 30.0)) == 120           # 60 s
    assert len(sample_indices(18000, 30.0)) == 768          # 10 min: capped at FPS_MAX_FRAMES
    assert sample_indices(6, 30.0) == [0, 2, 3, 5]          # 0.2 s: raised to the 4-frame minimum
    assert sample_indices(3, 30.0) == [0, 2]                # ... but at most floor_by_factor(3, 2) = 2
    assert len(sample_indices(300, 30.0, fps=1.0)) == 10


def test_sample_indices_nframes_and_errors():
    assert len(sample_indices(300, 30.0, nframes=6)) == 6
    assert len(sample_indices(300, 30.0, nframes=7)) == 8   # round(3.5) = 4 -> 8
    assert len(sample_indices(300, 30.0, nframes=5)) == 4   # round(2.5) = 2 (banker's) -> 4
    with pytest.raises(ValueError, match="1 frames"):       # 1-frame video: max_f = 0
        sample_indices(1, 30.0)
    with pytest.raises(ValueError, match="2 <= frames <= 300"):
        sample_indices(300, 30.0, nframes=400)


def test_frame_pixels_and_resize():
    assert frame_pixels(20) == 768 * 28 * 28                # plenty of budget: VIDEO_MAX_PIXELS
    assert int(frame_pixels(120)) == 321126                 # 60 s 1280x720
    assert smart_resize(720, 1280, 28, 128 * 28 * 28, frame_pixels(120)) == (420, 728)
    assert frame_pixels(768) == 105369                      # 10 min: floor int(100352 * 1.05) wins
    assert smart_resize(1080, 1920, 28, 128 * 28 * 28, frame_pixels(768)) == (224, 420)


# ---- reading files ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["decord", "av"])
def test_ten_second_clip(clips, backend):
    v = read_video(clips["ten"], backend=backend)
    assert v.frames.shape == (20, 3, 364, 644) and v.frames.dtype == torch.uint8
    assert v.fps == 2.0
    assert v.indices == torch.linspace(0, 299, 20).round().long().tolist()
    assert [frame_number(f) for f in v.frames] == v.indices  # the frames really are those frames


def test_backends_agree(clips):
    a = read_video(str(clips["two"]), backend="decord", nframes=6)
    b = read_video(str(clips["two"]), backend="av", nframes=6)
    assert a.indices == b.indices == [0, 12, 24, 35, 47, 59] and a.fps == b.fps == 6.0 / 60 * 30
    assert (a.frames.float() - b.frames.float()).abs().mean() < 2


def test_two_second_clip_and_nframes(clips):
    v = read_video(clips["two"])
    assert v.indices == [0, 20, 39, 59] and v.fps == 2.0
    assert [frame_number(f) for f in v.frames] == v.indices
    v = read_video(clips["two"], nframes=7, backend="av")    # odd -> even
    assert len(v.indices) == v.frames.shape[0] == 8
    assert [frame_number(f) for f in v.frames] == v.indices


def test_max_pixels_override(clips):
    v = read_video(clips["two"], max_pixels=50_000)          # 0.0.8: overrides even min_pixels
    assert v.frames.shape == (4, 3, 140, 280)


def test_av_fallback_without_decord(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)         # `import decord` now raises ImportError
    assert read_video(clips["two"]).indices == [0, 20, 39, 59]
    with pytest.raises(ValueError, match="backend='av'"):
        read_video(clips["two"], backend="decord")


# ---- lists of frames ----------------------------------------------------------------------------

def test_list_of_pil_frames_padded_to_even():
    frames = [Image.new("RGB", (150, 100), (40 * i, 10, 200)) for i in range(5)]
    v = read_video(frames, fps=1.5)
    assert v.frames.shape == (6, 3, 280, 392)                # min_pixels upscales 100x150
    assert v.indices == [0, 1, 2, 3, 4, 4] and v.fps == 1.5
    assert [int(f[0].float().mean().round()) for f in v.frames] == [0, 40, 80, 120, 160, 160]


def test_list_of_numpy_frames():
    frames = [draw_frame(i) for i in (3, 100, 257, 511)] + [draw_frame(7)[:, :, 0]]  # last one greyscale
    with pytest.raises(ValueError, match="expected"):
        read_video(frames)
    v = read_video(frames[:4])
    assert v.frames.shape == (4, 3, 364, 644) and v.indices == [0, 1, 2, 3]
    assert [frame_number(f) for f in v.frames] == [3, 100, 257, 511]


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["decord", "av"])
@pytest.mark.parametrize("name,what", [("missing", "not found"), ("text", "cannot be decoded"),
                                       ("zero", "cannot be decoded"), ("one", "1 frame"),
                                       ("truncated", "cannot be decoded")])
def test_bad_files(clips, backend, name, what):
    with pytest.raises(ValueError, match=what) as e:
        read_video(clips[name], backend=backend)
    assert clips[name].name in str(e.value)


def test_empty_list_and_bad_backend(clips):
    with pytest.raises(ValueError, match="empty list"):
        read_video([])
    with pytest.raises(ValueError, match="expected None, 'decord' or 'av'"):
        read_video(clips["two"], backend="torchvision")


def test_unknown_fps(clips, monkeypatch):
    monkeypatch.setattr(video, "_open", lambda path, backend: (path, 100, 0.0))
    with pytest.raises(ValueError, match="frame rate") as e:
        read_video(clips["two"])
    assert "two_s.mp4" in str(e.value)


def test_hanging_decoder_times_out(clips, monkeypatch):
    monkeypatch.setattr(video, "_open", lambda path, backend: time.sleep(5))
    t = time.perf_counter()
    with pytest.raises(ValueError, match="did not finish within 0.5 s") as e:
        read_video(clips["two"], timeout=0.5)
    assert time.perf_counter() - t < 2.5 and "two_s.mp4" in str(e.value)


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_container_with_zero_frames(tmp_path, backend):
    """A well-formed container header with a video stream but not a single encoded frame."""
    path = tmp_path / "zero_frames.mkv"   # (the mp4 muxer writes nothing at all without frames)
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=30)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    c.start_encoding()                         # writes the header; no frame is ever muxed
    c.close()
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="zero_frames.mkv"):
        read_video(path, backend=backend)
