"""Stage 1 tests: image preprocessing vs transformers' Qwen2VLImageProcessorPil, patch order, smart_resize
worked numbers (REFERENCE 7), video token counts (REFERENCE 4.3 / 7), the chat template vs its Jinja text,
placeholder expansion and batching, bad-input errors, and config.json reading (REFERENCE 1.1).
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import qwen2vl_min as q
from helpers import random_image
from qwen2vl_min import processor as P
from qwen2vl_min.processor import (CLIP_MEAN, CLIP_STD, QWEN2VL_CHAT_TEMPLATE, Processor, apply_chat_template,
                                   image_to_patches, load_image, smart_resize, video_to_patches)

HUB_MIN, HUB_MAX = 3136, 12_845_056          # hub preprocessor_config.json / qwen-vl-utils
CLASS_MAX = 1_003_520                         # transformers class default (28*28*1280)
SMALL_MAX = 200_704                           # 256 tokens: keeps the HF comparisons fast


def hf_image_processor(min_pixels, max_pixels):
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def hf_patches(image, min_pixels, max_pixels):
    out = hf_image_processor(min_pixels, max_pixels)(images=[image], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


# ------------------------------------------------------------------------------------------------
# 1. image_to_patches vs transformers' Qwen2VLImageProcessorPil

def _rgba(w, h, seed):
    """Random colours with alpha varying from 0 (fully transparent) to 255, plus some random alpha."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[: h // 3, :, 3] = 0                     # fully transparent band -> pure white after compositing
    a[h // 3: 2 * h // 3, :, 3] = 255         # opaque band
    return Image.fromarray(a, "RGBA")


def _la(w, h, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)
    a[:, : w // 4, 1] = 0
    return Image.fromarray(a, "LA")


def _palette(w, h, seed, transparency=None):
    img = random_image(w, h, seed).quantize(colors=16)       # mode P with a 16-colour palette
    assert img.mode == "P"
    if transparency == "index":
        img.info["transparency"] = 3                          # one palette entry fully transparent
    elif transparency == "bytes":                             # per-entry alpha (tRNS chunk)
        img.info["transparency"] = bytes(range(0, 256, 16))
    return img


IMAGE_CASES = {
    "rgb-57x131": (lambda: random_image(57, 131, 1), HUB_MIN, SMALL_MAX),
    "rgb-333x17-upscaled": (lambda: random_image(333, 17, 2), 20_000, SMALL_MAX),   # 28*336 < 20000: min branch
    "rgb-1000x999-downscaled": (lambda: random_image(1000, 999, 3), HUB_MIN, SMALL_MAX),
    "rgb-2800x15-ratio187": (lambda: random_image(2800, 15, 4), HUB_MIN, SMALL_MAX),
    "rgb-28x5000-ratio179": (lambda: random_image(28, 5000, 5), HUB_MIN, SMALL_MAX),
    "rgb-tiny-7x5": (lambda: random_image(7, 5, 6), HUB_MIN, SMALL_MAX),
    "rgba-varied-alpha": (lambda: _rgba(121, 87, 7), HUB_MIN, SMALL_MAX),
    "L": (lambda: random_image(99, 140, 8, mode="L"), HUB_MIN, SMALL_MAX),
    "1-bilevel": (lambda: random_image(64, 50, 9).convert("1"), HUB_MIN, SMALL_MAX),
    "P-no-transparency": (lambda: _palette(130, 70, 10), HUB_MIN, SMALL_MAX),
    "P-transparent-index": (lambda: _palette(130, 70, 11, "index"), HUB_MIN, SMALL_MAX),
    "P-transparency-bytes": (lambda: _palette(90, 90, 12, "bytes"), HUB_MIN, SMALL_MAX),
    "LA-varied-alpha": (lambda: _la(77, 45, 13), HUB_MIN, SMALL_MAX),
    "CMYK": (lambda: random_image(150, 101, 14).convert("CMYK"), HUB_MIN, SMALL_MAX),
    "rgb-640x480-hub-max": (lambda: random_image(640, 480, 15), HUB_MIN, HUB_MAX),
    "rgb-1001x333-class-max": (lambda: random_image(1001, 333, 16), HUB_MIN, CLASS_MAX),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_image_to_patches_matches_transformers(name):
    make, min_pixels, max_pixels = IMAGE_CASES[name]
    img = make()
    ref_pv, ref_grid = hf_patches(img, min_pixels, max_pixels)
    pv, grid = image_to_patches(img, min_pixels=min_pixels, max_pixels=max_pixels)
    assert grid.tolist() == ref_grid.tolist()
    assert pv.shape == ref_pv.shape and pv.dtype == torch.float32
    assert (pv - ref_pv).abs().max().item() <= 1e-5
    # the grid is what smart_resize says (transformers' own copy agrees)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    h, w = hf_smart_resize(img.height, img.width, 28, min_pixels, max_pixels)
    assert grid.tolist() == [[1, h // 14, w // 14]]


def test_upscale_case_really_uses_min_pixels():
    """Guard for the test table: 333x17 must go through the min_pixels branch, 1000x999 through max."""
    assert round(17 / 28) * 28 * round(333 / 28) * 28 < 20_000
    assert smart_resize(17, 333, 28, 20_000, SMALL_MAX) == (56, 644)
    assert smart_resize(999, 1000, 28, HUB_MIN, SMALL_MAX)[0] < 999


def test_alpha_composited_on_white():
    """Transparent pixels become white (1.0 after un-normalising), opaque ones keep their colour."""
    a = np.zeros((56, 56, 4), np.uint8)
    a[..., :3] = (10, 200, 30)
    a[:28, :, 3] = 0           # top half transparent -> white
    a[28:, :, 3] = 255         # bottom half opaque
    for img in (Image.fromarray(a, "RGBA"), Image.fromarray(a, "RGBA").convert("LA")):
        rgb = np.array(load_image(img))
        assert rgb.shape == (56, 56, 3)
        assert (rgb[:28] == 255).all()
        assert (rgb[28:] == np.array(img.convert("RGB"))[28:]).all()
        pv, _ = image_to_patches(img)
        ref, _ = hf_patches(img, HUB_MIN, HUB_MAX)
        assert (pv - ref).abs().max().item() <= 1e-5
    # numpy (H, W, 4) uint8 input takes the same path as a PIL RGBA image
    assert (np.array(load_image(a))[:28] == 255).all()


# ------------------------------------------------------------------------------------------------
# 2. Patch order (REFERENCE 3.3)

def _unnormalise(rows):
    """(N, 1176) -> (N, 3, 2, 14, 14) pixel values 0..255 (rounded)."""
    x = rows.reshape(-1, 3, 2, 14, 14)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1)
    return ((x * std + mean) * 255).round()


def test_patch_order_constant_patches():
    """56x56, each 14x14 patch constant and distinct: rows come in 2x2 merge windows, raster order."""
    a = np.zeros((56, 56, 3), np.uint8)
    for i in range(4):
        for j in range(4):
            v = 10 * (4 * i + j) + 5
            a[14 * i: 14 * i + 14, 14 * j: 14 * j + 14] = (v, v + 1, v + 2)   # channel offsets: R < G < B
    pv, grid = image_to_patches(Image.fromarray(a), min_pixels=HUB_MIN, max_pixels=HUB_MAX)
    assert grid.tolist() == [[1, 4, 4]] and pv.shape == (16, 1176)
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
             (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    px = _unnormalise(pv)
    for r, (i, j) in enumerate(order):
        v = 10 * (4 * i + j) + 5
        for c in range(3):
            assert (px[r, c] == v + c).all(), f"row {r}: expected patch {(i, j)} channel {c}"
        assert torch.equal(pv.reshape(-1, 3, 2, 196)[r, :, 0], pv.reshape(-1, 3, 2, 196)[r, :, 1])
    # first 196 values of row 0 = channel R, t=0 of patch (0,0)
    assert torch.allclose(pv[0, :196], torch.full((196,), (5 / 255 - CLIP_MEAN[0]) / CLIP_STD[0]), atol=1e-6)
    # vector layout is (C, T, 14, 14): values 196..391 are R at t=1 (equal to t=0), 392..587 are G at t=0
    assert torch.equal(pv[0, 196:392], pv[0, :196])
    assert torch.allclose(pv[0, 392:588], torch.full((196,), (6 / 255 - CLIP_MEAN[1]) / CLIP_STD[1]), atol=1e-6)
    # the same image through transformers
    ref, ref_grid = hf_patches(Image.fromarray(a), HUB_MIN, HUB_MAX)
    assert ref_grid.tolist() == [[1, 4, 4]] and (pv - ref).abs().max().item() <= 1e-5


def test_patch_vector_layout_and_row_major():
    """Inside a row: (C, T, 14, 14), 14x14 row-major. G encodes the pixel row, B the pixel column."""
    a = np.zeros((56, 56, 3), np.uint8)
    yy, xx = np.mgrid[0:56, 0:56]
    a[..., 0] = 15 * ((yy // 14) * 4 + (xx // 14))   # patch id
    a[..., 1] = 18 * (yy % 14)                        # row inside the patch
    a[..., 2] = 18 * (xx % 14)                        # column inside the patch
    img = Image.fromarray(a)
    pv, _ = image_to_patches(img, min_pixels=HUB_MIN, max_pixels=HUB_MAX)
    px = _unnormalise(pv)                             # (16, C, T, 14, 14)
    rows = torch.arange(14).view(14, 1).expand(14, 14) * 18.0
    cols = torch.arange(14).view(1, 14).expand(14, 14) * 18.0
    for r in range(16):
        for t in range(2):
            assert torch.equal(px[r, 1, t], rows) and torch.equal(px[r, 2, t], cols)
    # flat index: first 196 = R t0, next 196 = R t1, then G t0 ... ; check R t0 row-major via the raw vector
    flat = ((pv[:, :] * torch.tensor(CLIP_STD).repeat_interleave(392) + torch.tensor(CLIP_MEAN).repeat_interleave(392))
            * 255).round()
    assert torch.equal(flat[0, 392:392 + 196], rows.flatten())        # G, t=0
    assert torch.equal(flat[0, 392 + 196:784], rows.flatten())        # G, t=1
    assert torch.equal(flat[0, 784:784 + 196], cols.flatten())        # B, t=0
    ids = [int(flat[r, 0].item()) // 15 for r in range(16)]
    assert ids == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    ref, _ = hf_patches(img, HUB_MIN, HUB_MAX)
    assert (pv - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------
# 3. smart_resize worked numbers (REFERENCE 7)

# (W, H) -> ((W', H'), grid, tokens) under max 1,003,520 and under max 12,845,056
TABLE7 = [
    ((224, 224), ((224, 224), (1, 16, 16), 64), ((224, 224), (1, 16, 16), 64)),
    ((448, 448), ((448, 448), (1, 32, 32), 256), ((448, 448), (1, 32, 32), 256)),
    ((1280, 720), ((1288, 728), (1, 52, 92), 1196), ((1288, 728), (1, 52, 92), 1196)),
    ((1000, 1000), ((980, 980), (1, 70, 70), 1225), ((1008, 1008), (1, 72, 72), 1296)),
    ((1920, 1080), ((1316, 728), (1, 52, 94), 1222), ((1932, 1092), (1, 78, 138), 2691)),
    ((4032, 3024), ((1148, 840), (1, 60, 82), 1230), ((4032, 3024), (1, 216, 288), 15552)),
    ((640, 480), ((644, 476), (1, 34, 46), 391), ((644, 476), (1, 34, 46), 391)),
    ((1024, 768), ((1036, 756), (1, 54, 74), 999), ((1036, 756), (1, 54, 74), 999)),
    ((100, 100), ((112, 112), (1, 8, 8), 16), ((112, 112), (1, 8, 8), 16)),
    ((56, 56), ((56, 56), (1, 4, 4), 4), ((56, 56), (1, 4, 4), 4)),
]


@pytest.mark.parametrize("max_pixels,col", [(CLASS_MAX, 1), (HUB_MAX, 2)], ids=["class-max", "hub-max"])
@pytest.mark.parametrize("row", TABLE7, ids=[f"{r[0][0]}x{r[0][1]}" for r in TABLE7])
def test_smart_resize_table(row, max_pixels, col):
    (w, h), (size, grid, tokens) = row[0], row[col]
    h2, w2 = smart_resize(h, w, 28, HUB_MIN, max_pixels)
    assert (w2, h2) == size
    assert (1, h2 // 14, w2 // 14) == grid
    assert (h2 // 28) * (w2 // 28) == tokens
    if w * h <= 1_000_000:     # cheap enough to run the whole pipeline on a flat image
        img = Image.new("RGB", (w, h), (120, 60, 200))
        pv, g = image_to_patches(img, min_pixels=HUB_MIN, max_pixels=max_pixels)
        assert tuple(g[0].tolist()) == grid and pv.shape == (math.prod(grid), 1176)


def test_smart_resize_banker_rounding_and_defaults():
    # 42/28 = 1.5 -> round half to even = 2 -> 56;  70/28 = 2.5 -> 2 -> 56 (not 84)
    assert smart_resize(70, 2800, 28, HUB_MIN, HUB_MAX) == (56, 2800)
    assert smart_resize(42, 2800, 28, HUB_MIN, HUB_MAX) == (56, 2800)
    assert (P.MIN_PIXELS, P.MAX_PIXELS) == (HUB_MIN, HUB_MAX)
    assert smart_resize(1000, 1000) == (1008, 1008)      # module defaults = hub preprocessor_config


@pytest.mark.parametrize("wh,max_pixels,tokens", [((224, 224), HUB_MAX, 64), ((1000, 1000), HUB_MAX, 1296),
                                                  ((1000, 1000), CLASS_MAX, 1225)])
def test_image_tokens_in_prompt(tok, wh, max_pixels, tokens):
    """224x224 -> 64 <|image_pad|> + <|vision_start|> + <|vision_end|> = 66 (paper 2.1)."""
    proc = Processor(tok, min_pixels=HUB_MIN, max_pixels=max_pixels)
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", wh, (1, 2, 3))},
                                         {"type": "text", "text": "Describe the image."}]}]
    b = proc(msgs)
    ids = b.input_ids[0].tolist()
    n_pad = ids.count(tok.token_to_id("<|image_pad|>"))
    n_vis = ids.count(tok.token_to_id("<|vision_start|>")) + ids.count(tok.token_to_id("<|vision_end|>"))
    assert n_pad == tokens and n_vis == 2
    if wh == (224, 224):
        assert n_pad + n_vis == 66
        assert b.pixel_values.shape == (256, 1176) and b.image_grid_thw.tolist() == [[1, 16, 16]]
    assert b.media[0]["tokens"] == tokens


# ------------------------------------------------------------------------------------------------
# 4. Video token counts (REFERENCE 4.3, 7)

def _write_clip(path, n, w=640, h=360, rate=30):
    import av
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast"}
        for i in range(n):
            a = np.stack([(xx + 3 * i) % 256, (yy + i) % 256, np.full_like(xx, (7 * i) % 256)], -1).astype(np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc-clips")
    return {"ten": _write_clip(d / "ten.mp4", 300), "two": _write_clip(d / "two.mp4", 60)}


@pytest.mark.parametrize("name,grid,tokens", [("ten", (10, 26, 46), 2990), ("two", (2, 26, 46), 598)])
def test_video_tokens(tok, clips, name, grid, tokens):
    clip = q.video.read_video(clips[name])
    assert clip.frames.shape == (2 * grid[0], 3, 364, 644) and clip.frames.dtype == torch.uint8
    pv, g = video_to_patches(clip.frames)
    assert g.tolist() == [list(grid)]
    assert pv.shape == (math.prod(grid), 1176)
    assert math.prod(grid) // 4 == tokens
    proc = Processor(tok)
    b = proc([{"role": "user", "content": [{"type": "video", "video": str(clips[name])},
                                           {"type": "text", "text": "What is in the video?"}]}])
    ids = b.input_ids[0].tolist()
    assert ids.count(tok.token_to_id("<|video_pad|>")) == tokens
    assert ids.count(tok.token_to_id("<|image_pad|>")) == 0
    assert b.video_grid_thw.tolist() == [list(grid)] and b.pixel_values is None
    assert torch.equal(b.pixel_values_videos, pv)
    # the placeholder run is contiguous and framed by <|vision_start|> / <|vision_end|>
    first = ids.index(tok.token_to_id("<|video_pad|>"))
    assert ids[first - 1] == tok.token_to_id("<|vision_start|>")
    assert ids[first + tokens] == tok.token_to_id("<|vision_end|>")


def test_video_to_patches_odd_frames_pad_with_last():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (5, 3, 56, 84), generator=g, dtype=torch.uint8)
    pv, grid = video_to_patches(frames)
    assert grid.tolist() == [[3, 4, 6]] and pv.shape == (3 * 4 * 6, 1176)
    x = pv.reshape(3, 24, 3, 2, 196)
    assert torch.equal(x[2, :, :, 0], x[2, :, :, 1])          # padded temporal patch: two equal copies
    assert not torch.equal(x[0, :, :, 0], x[0, :, :, 1])      # real ones differ (random frames)
    # the pad is the last frame (not zeros, not the first): equals an image made of frame 4
    img_pv, _ = image_to_patches(Image.fromarray(frames[4].permute(1, 2, 0).numpy()), min_pixels=1, max_pixels=10**8)
    assert torch.equal(pv[48:], img_pv)
    # and the first two temporal patches equal those of the 4 frames alone
    pv4, grid4 = video_to_patches(frames[:4])
    assert grid4.tolist() == [[2, 4, 6]] and torch.equal(pv[:48], pv4)


# ------------------------------------------------------------------------------------------------
# 5. Chat template

def _render_jinja(messages, add_generation_prompt, add_vision_id):
    """The template rendered the way transformers does (sandboxed, trim_blocks + lstrip_blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return env.from_string(QWEN2VL_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        add_vision_id=add_vision_id)


def _render_hf(messages, add_generation_prompt, add_vision_id):
    from transformers.utils.chat_template_utils import _compile_jinja_template
    return _compile_jinja_template(QWEN2VL_CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)


IMG = {"type": "image", "image": "a.png"}
CHATS = {
    "one-image": [{"role": "user", "content": [IMG, {"type": "text", "text": "Describe."}]}],
    "text-string": [{"role": "user", "content": "Hello! How are you today?"}],
    "system": [{"role": "system", "content": "You are a pirate."},
               {"role": "user", "content": [{"type": "text", "text": "Hi"}, IMG]}],
    "system-list": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    {"role": "user", "content": "Hi"}],
    "multi-turn": [{"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]},
                   {"role": "assistant", "content": "A cat."},
                   {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"image": "b.png"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
                   {"role": "user", "content": "Thanks"}],
    "two-images-video": [{"role": "user", "content": [IMG, {"type": "image_url", "image_url": "http://x/b.jpg"},
                                                      {"type": "video", "video": "c.mp4"},
                                                      {"type": "text", "text": "Which picture is brighter?"}]},
                         {"role": "assistant", "content": "The first."},
                         {"role": "user", "content": [{"video": "d.mp4"}, {"image": "e.png"}]}],
    "untyped-items": [{"role": "user", "content": [{"image": "a.png"}, {"text": "no type key"}, {"video": ["f1", "f2"]}]}],
}


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_matches_jinja(name, add_generation_prompt, add_vision_id):
    msgs = CHATS[name]
    ours = apply_chat_template(msgs, add_generation_prompt, add_vision_id)
    assert ours == _render_jinja(msgs, add_generation_prompt, add_vision_id)
    assert ours == _render_hf(msgs, add_generation_prompt, add_vision_id)
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_vision_ids():
    s = apply_chat_template(CHATS["two-images-video"], True, True)
    assert s.count("Picture 1: <|vision_start|><|image_pad|>") == 1
    assert s.count("Picture 2: <|vision_start|><|image_pad|>") == 1
    assert s.count("Picture 3: <|vision_start|><|image_pad|>") == 1      # counters run across turns
    assert s.count("Video 1: <|vision_start|><|video_pad|>") == 1
    assert s.count("Video 2: <|vision_start|><|video_pad|>") == 1
    assert "Picture" not in apply_chat_template(CHATS["two-images-video"], True, False)


def test_chat_template_reference_string():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n")
    assert apply_chat_template(msgs) == expected
    assert _render_jinja(msgs, True, False) == expected
    assert apply_chat_template(CHATS["system"], False) == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHi"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n")


# ------------------------------------------------------------------------------------------------
# 6. Placeholder expansion and batching

def _expected_ids(tok, messages, grids_img, grids_vid=()):
    """HF processing_qwen2_vl: replace each pad, in order, by grid.prod() // 4 copies, then tokenise."""
    text = apply_chat_template(messages)
    for kind, grids in (("image", grids_img), ("video", grids_vid)):
        for g in grids:
            text = text.replace(f"<|{kind}_pad|>", "<|placeholder|>" * (math.prod(g) // 4), 1)
        text = text.replace("<|placeholder|>", f"<|{kind}_pad|>")
    return tok.encode(text, add_special_tokens=False).ids


def _runs(ids, token):
    runs, n = [], 0
    for t in ids + [None]:
        if t == token:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_placeholder_expansion_two_images(tok, pair_a):
    proc = pair_a.processor
    assert (proc.min_pixels, proc.max_pixels) == (56 * 56, 28 * 28 * 64)
    im1, im2 = random_image(112, 56, 1), random_image(84, 168, 2)
    msgs = [{"role": "user", "content": [{"type": "image", "image": im1}, {"type": "text", "text": "Which picture is"},
                                         {"type": "image", "image": im2}, {"type": "text", "text": " brighter?"}]}]
    b = proc(msgs)
    g1, g2 = [1, 4, 8], [1, 12, 6]
    assert b.image_grid_thw.tolist() == [g1, g2]
    ids = b.input_ids[0].tolist()
    assert _runs(ids, tok.token_to_id("<|image_pad|>")) == [8, 18]
    assert ids == _expected_ids(tok, msgs, [g1, g2])
    p1, _ = image_to_patches(im1, proc.min_pixels, proc.max_pixels)
    p2, _ = image_to_patches(im2, proc.min_pixels, proc.max_pixels)
    assert torch.equal(b.pixel_values, torch.cat([p1, p2]))
    assert b.attention_mask.tolist() == [[1] * len(ids)]
    assert [m["tokens"] for m in b.media] == [8, 18]


def test_batch_left_padding(tok, pair_a):
    proc = pair_a.processor
    im1, im2, im3 = random_image(56, 56, 3), random_image(200, 100, 4), random_image(70, 140, 5)
    conv1 = [{"role": "user", "content": [{"type": "image", "image": im1}, {"type": "text", "text": "Hi"}]}]
    conv2 = [{"role": "user", "content": [{"type": "image", "image": im2}, {"type": "image", "image": im3},
                                          {"type": "text", "text": "Which picture is brighter? Describe the image."}]}]
    single = [proc(c) for c in (conv1, conv2)]
    b = proc.batch([conv1, conv2])
    pad = tok.token_to_id("<|endoftext|>")
    assert proc.pad_token_id == pad
    n1, n2 = (s.input_ids.shape[1] for s in single)
    assert n2 > n1 and b.input_ids.shape == (2, n2)
    assert b.input_ids[0, : n2 - n1].tolist() == [pad] * (n2 - n1)
    assert b.attention_mask[0].tolist() == [0] * (n2 - n1) + [1] * n1
    assert b.attention_mask[1].tolist() == [1] * n2
    assert torch.equal(b.input_ids[0, n2 - n1:], single[0].input_ids[0])
    assert torch.equal(b.input_ids[1], single[1].input_ids[0])
    assert torch.equal(b.pixel_values, torch.cat([single[0].pixel_values, single[1].pixel_values]))
    assert b.image_grid_thw.tolist() == single[0].image_grid_thw.tolist() + single[1].image_grid_thw.tolist()
    assert b.pixel_values.shape[0] == int(b.image_grid_thw.prod(-1).sum())
    assert set(b.stop_token_ids) == {tok.token_to_id("<|im_end|>"), pad}
    # placeholders in the batch = merged patches of every image
    n_pad = int((b.input_ids == tok.token_to_id("<|image_pad|>")).sum())
    assert n_pad == int(b.image_grid_thw.prod(-1).sum()) // 4


# ------------------------------------------------------------------------------------------------
# 7. Bad input -> ValueError naming the problem

def test_extreme_aspect_ratio_rejected():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(20, 10000)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10000, 20)
    with pytest.raises(ValueError, match="aspect ratio"):
        image_to_patches(Image.new("RGB", (10000, 20)))
    smart_resize(20, 4000)                      # ratio exactly 200 is legal


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    random_image(200, 150, 7).save(d / "good.png")
    data = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.mp4").write_text("this is not a video\n")
    return d


@pytest.mark.parametrize("name", ["random.png", "truncated.png", "empty.png"])
def test_bad_image_files(tok, bad_files, name):
    path = bad_files / name
    for src in (path, str(path)):
        with pytest.raises(ValueError, match="cannot be read as an image") as e:
            load_image(src)
        assert name in str(e.value)
    with pytest.raises(ValueError, match="cannot be read as an image"):
        image_to_patches(str(path))
    proc = Processor(tok, min_pixels=HUB_MIN, max_pixels=SMALL_MAX)
    with pytest.raises(ValueError, match="cannot be read as an image"):
        proc([{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Hi"}]}])
    assert load_image(bad_files / "good.png").size == (200, 150)     # the intact file is fine


def test_text_file_as_video(tok, bad_files):
    proc = Processor(tok)
    with pytest.raises(ValueError, match="cannot be decoded as a video"):
        proc([{"role": "user", "content": [{"type": "video", "video": str(bad_files / "notes.mp4")}]}])


def test_more_image_pads_than_images(tok):
    proc = Processor(tok, min_pixels=HUB_MIN, max_pixels=SMALL_MAX)
    msgs = [{"role": "user", "content": [{"type": "image", "image": random_image(56, 56)},
                                         {"type": "text", "text": "look: <|image_pad|>"}]}]
    with pytest.raises(ValueError, match=r"<\|image_pad\|>") as e:
        proc(msgs)
    assert "2" in str(e.value) and "image" in str(e.value)
    msgs_v = [{"role": "user", "content": [{"type": "text", "text": "<|video_pad|> what?"}]}]
    with pytest.raises(ValueError, match=r"<\|video_pad\|>"):
        proc(msgs_v)


@pytest.mark.parametrize("arr,word", [(np.zeros((28, 28), np.uint8), "shape"),
                                      (np.zeros((28, 28, 2), np.uint8), "shape"),
                                      (np.zeros((1, 28, 28, 3), np.uint8), "shape"),
                                      (np.zeros((28, 28, 3), np.float32), "dtype"),
                                      (np.zeros((28, 28, 3), np.int64), "dtype")])
def test_bad_arrays(arr, word):
    with pytest.raises(ValueError, match=word):
        load_image(arr)
    with pytest.raises(ValueError, match=word):
        image_to_patches(arr)


def test_bad_misc_inputs():
    with pytest.raises(ValueError, match="type"):
        load_image(12345)
    with pytest.raises(ValueError, match="shape"):
        video_to_patches(torch.zeros(4, 3, 50, 56, dtype=torch.uint8))      # H not a multiple of 28
    with pytest.raises(ValueError, match="shape"):
        video_to_patches(torch.zeros(4, 56, 56, 3, dtype=torch.uint8))      # channels last
    pv, g = image_to_patches(np.full((30, 40, 3), 7, np.uint8))              # a good array works
    assert g.tolist() == [[1, 4, 6]]                                            # 30x40 -> 56x84 (min_pixels)


# ------------------------------------------------------------------------------------------------
# 8. Config reading (REFERENCE 1.1)

def hub_2b():
    """Qwen2-VL-2B-Instruct config.json (flat hub layout), every key as shipped."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {"hidden_size": 1536, "in_chans": 3, "spatial_patch_size": 14},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
    }


def hub_7b():
    d = hub_2b()
    d.update(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
             vocab_size=152064, tie_word_embeddings=False,
             vision_config={"in_chans": 3, "spatial_patch_size": 14})        # no hidden_size (current 7B copies)
    return d


def test_config_2b_flat():
    c = q.Qwen2VLConfig.from_dict(hub_2b())
    assert (c.vision.depth, c.vision.embed_dim, c.vision.num_heads, c.vision.head_dim) == (32, 1280, 16, 80)
    assert (c.vision.hidden_size, c.vision.patch_size, c.vision.in_channels) == (1536, 14, 3)
    assert c.text.head_dim == 128 and c.text.mrope_section == (16, 24, 24)
    assert c.text.tie_word_embeddings is True
    assert (c.text.num_hidden_layers, c.text.num_key_value_heads, c.text.vocab_size) == (28, 2, 151936)
    assert c.text.rms_norm_eps == 1e-6 and c.text.rope_theta == 1e6
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id) == (151655, 151656, 151652)
    assert c == q.PRESETS["2B"]


def test_config_7b_flat_vision_hidden_from_text():
    c = q.Qwen2VLConfig.from_dict(hub_7b())
    assert c.vision.hidden_size == 3584 and c.text.tie_word_embeddings is False
    assert c == q.PRESETS["7B"]


@pytest.mark.parametrize("make", [hub_2b, hub_7b])
def test_config_nested_v5_equals_flat(tmp_path, make):
    from transformers import Qwen2VLConfig as HFConfig
    flat = make()
    ours = q.Qwen2VLConfig.from_dict(flat)
    hf = HFConfig(**flat)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in saved and "rope_parameters" in saved["text_config"]
    assert q.Qwen2VLConfig.from_dict(saved) == ours


@pytest.mark.parametrize("make", [hub_2b, hub_7b])
def test_config_nested_v5_full_to_dict(make):
    """transformers' to_dict() (= config.json written with use_diff=False) must read like its flat twin."""
    from transformers import Qwen2VLConfig as HFConfig
    flat = make()
    nested = HFConfig(**flat).to_dict()
    assert "text_config" in nested
    assert q.Qwen2VLConfig.from_dict(nested) == q.Qwen2VLConfig.from_dict(flat)


def test_config_errors():
    d = hub_2b()
    d["frobnicate_layers"] = 3
    with pytest.raises(ValueError, match="frobnicate_layers"):
        q.Qwen2VLConfig.from_dict(d)
    d = hub_2b()
    d["vision_config"] = {**d["vision_config"], "window_size": 112}
    with pytest.raises(ValueError, match="window_size"):
        q.Qwen2VLConfig.from_dict(d)
    d = hub_2b()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        q.Qwen2VLConfig.from_dict(d)
    d = hub_2b()
    del d["num_attention_heads"]
    with pytest.raises(ValueError, match="num_attention_heads"):
        q.Qwen2VLConfig.from_dict(d)


@pytest.mark.parametrize("name", ["2B", "7B", "72B"])
def test_config_round_trip(name):
    cfg = q.PRESETS[name]
    d = cfg.to_dict()
    assert q.Qwen2VLConfig.from_dict(d) == cfg
    assert q.Qwen2VLConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("name", ["2B", "7B", "72B"])
def test_transformers_reads_our_flat_layout(name):
    from transformers import Qwen2VLConfig as HFConfig
    cfg = q.PRESETS[name]
    hf = HFConfig(**cfg.to_dict())
    t = hf.text_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size) == (cfg.text.hidden_size, cfg.text.intermediate_size,
                                                     cfg.text.num_hidden_layers, cfg.text.num_attention_heads,
                                                     cfg.text.num_key_value_heads, cfg.text.vocab_size)
    assert t.rms_norm_eps == cfg.text.rms_norm_eps
    assert list(t.rope_parameters["mrope_section"]) == list(cfg.text.mrope_section)
    assert t.rope_parameters["rope_theta"] == cfg.text.rope_theta
    assert hf.tie_word_embeddings == cfg.text.tie_word_embeddings
    assert hf.vision_config.hidden_size == cfg.vision.hidden_size and hf.vision_config.depth == 32


@pytest.mark.parametrize("variant", ["a", "b"])
def test_transformers_reads_our_flat_layout_tiny(tok, variant):
    """Same check on the tiny test configs (integer mlp_ratio): isolates the layout from the mlp_ratio type."""
    from helpers import hf_config_dict
    from transformers import Qwen2VLConfig as HFConfig
    cfg = q.Qwen2VLConfig.from_dict(hf_config_dict(tok, layout="flat", variant=variant))
    assert q.Qwen2VLConfig.from_dict(hf_config_dict(tok, layout="nested", variant=variant)) == cfg
    hf = HFConfig(**cfg.to_dict())
    assert hf.text_config.hidden_size == cfg.text.hidden_size
    assert hf.text_config.num_key_value_heads == cfg.text.num_key_value_heads
    assert list(hf.text_config.rope_parameters["mrope_section"]) == list(cfg.text.mrope_section)
    assert hf.vision_config.embed_dim == cfg.vision.embed_dim and hf.vision_config.hidden_size == cfg.vision.hidden_size
    assert hf.tie_word_embeddings == cfg.text.tie_word_embeddings


@pytest.mark.parametrize("messages,where", [
    ([{"role": "user", "content": [Image.new("RGB", (56, 56)), {"type": "text", "text": "Hi"}]}],
     r"message 0 \(.*PIL.Image"),
    ([{"content": "Hi"}], r"message 0 \({'content': 'Hi'}\) is not a dict with 'role'"),
    ({"role": "user", "content": "Hi"}, "messages must look like"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": 42}], "message 1 .*a string or a list"),
])
def test_malformed_messages_name_the_part(tok, messages, where):
    """A bare PIL image in the content list (a common slip) gets a ValueError with the right shape, not a crash."""
    with pytest.raises(ValueError, match=where):
        Processor(tok)(messages)
