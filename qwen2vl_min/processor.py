"""Stage 1 — from chat messages with images / videos to the tensors the model eats.

Images: convert to RGB, `smart_resize` to multiples of 28, bicubic resize, CLIP-normalise, cut into
14x14x2 "tubes" (an image is two identical frames) flattened to rows of 1176 values, ordered so that
4 consecutive rows are one 2x2 merge window. Text: the Qwen2-VL ChatML template, tokenised with the
checkpoint's tokenizer.json, each <|image_pad|> / <|video_pad|> expanded to one token per merged patch.
Matches transformers' Qwen2VLImageProcessor(Pil) + Qwen2VLProcessor and qwen-vl-utils (REFERENCE 3, 6).
"""
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import video as video_io

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28   # 4 .. 16384 visual tokens (hub preprocessor_config)
MAX_ASPECT_RATIO = 200
DEFAULT_SYSTEM = "You are a helpful assistant."
# The Jinja template that Qwen2-VL-*-Instruct ship (written to tokenizer_config.json by `save`);
# apply_chat_template below renders exactly the same text in Python.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def smart_resize(height, width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """Snap (height, width) to multiples of `factor` with the pixel count inside [min, max] (REFERENCE 3.1)."""
    if min(height, width) < 1:
        raise ValueError(f"image {width}x{height} is empty; pass an image with at least one pixel")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {width}x{height} has aspect ratio {max(height, width) / min(height, width):.0f} "
                         f"> {MAX_ASPECT_RATIO}; crop or pad it to a less extreme shape")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor  # Python round: banker's
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(image) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array -> RGB PIL image; transparency composited on white."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as f:
                f.load()                       # decode now so a truncated file fails here, not later
                image = f.copy()
        except Image.DecompressionBombError as e:
            raise ValueError(f"image {image}: too many pixels ({e}); downscale it first") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"image {image}: cannot be read as an image ({e}); "
                             "pass a valid PNG/JPEG/WebP file") from None
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"image array of shape {image.shape} and dtype {image.dtype}: expected "
                             "(H, W, 3) or (H, W, 4) uint8")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"image of type {type(image).__name__}: expected a path, PIL.Image or numpy array")
    if image.mode == "RGB":
        return image
    if image.mode == "CMYK":
        return image.convert("RGB")
    # Same as transformers' convert_to_rgb: RGBA over an opaque white background (P/LA/L too).
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _patchify(frames: torch.Tensor, patch=14, temporal=2, merge=2, mean=CLIP_MEAN, std=CLIP_STD):
    """(T, C, H, W) 0..255 -> pixel rows (grid_t*gh*gw, C*temporal*patch*patch), grid (1, 3)."""
    if frames.shape[0] % temporal:               # pad with the last frame to whole temporal patches
        pad = temporal - frames.shape[0] % temporal
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    x = frames.float() * (1 / 255)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    T, C, H, W = x.shape
    gt, gh, gw = T // temporal, H // patch, W // patch
    # (T, C, H, W) -> (gt, t, C, gh/m, m, p, gw/m, m, p)
    x = x.reshape(gt, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    # -> (gt, gh/m, gw/m, m, m, C, t, p, p): window-major, row-major inside each 2x2 window.
    # This is one end of the merge invariant: 4 consecutive rows = one 2x2 window (vision.PatchMerger).
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gt * gh * gw, C * temporal * patch * patch)   # (N, 1176)
    return rows, torch.tensor([[gt, gh, gw]])


def image_to_patches(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch=14, merge=2, temporal=2):
    """Any image -> (pixel_values (N, 1176), grid_thw (1, 3)); grid in 14 px patches, before merging."""
    image = load_image(image)
    h, w = smart_resize(image.height, image.width, patch * merge, min_pixels, max_pixels)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)             # (H, W, C) -> (C, H, W)
    return _patchify(x[None].expand(temporal, -1, -1, -1), patch, temporal, merge)  # an image = 2 equal frames


def video_to_patches(frames: torch.Tensor, patch=14, merge=2, temporal=2):
    """Resized uint8 frames (T, 3, H, W) -> (pixel_values_videos (N, 1176), grid_thw (1, 3))."""
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[2] % (patch * merge) or frames.shape[3] % (patch * merge):
        raise ValueError(f"video frames of shape {tuple(frames.shape)}: expected (T, 3, H, W) with H and W "
                         f"multiples of {patch * merge}; use qwen2vl_min.video.read_video to get them")
    return _patchify(frames, patch, temporal, merge)


def media_kind(item: dict):
    """"image", "video" or None for one content item, by the same test the Jinja template uses."""
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    return "video" if item.get("type") == "video" or "video" in item else None


def check_messages(messages):
    """Messages in the chat format, or a ValueError that names the wrong part and shows the right shape."""
    shape = '[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "..."}]}]'
    for i, m in enumerate(messages if isinstance(messages, (list, tuple)) else [messages]):
        c = m.get("content") if isinstance(m, dict) else None
        if not (isinstance(messages, (list, tuple)) and isinstance(m, dict) and "role" in m and (isinstance(c, str) or
                isinstance(c, (list, tuple)) and all(isinstance(it, dict) for it in c))):
            raise ValueError(f"message {i} ({str(m)[:90]}) is not a dict with 'role' and 'content' (a string or a "
                             f"list of dicts, one per image / video / text); messages must look like {shape}")


def apply_chat_template(messages, add_generation_prompt=True, add_vision_id=False) -> str:
    """The Qwen2-VL-Instruct Jinja template, written out in Python (REFERENCE 6)."""
    check_messages(messages)
    out, n_img, n_vid = [], 0, 0
    if messages and messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for message in messages:
        out.append(f"<|im_start|>{message['role']}\n")
        content = message["content"]
        for item in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            kind = media_kind(item)
            if kind == "image":
                n_img += 1
                out.append(f"Picture {n_img}: " * add_vision_id + "<|vision_start|><|image_pad|><|vision_end|>")
            elif kind == "video":
                n_vid += 1
                out.append(f"Video {n_vid}: " * add_vision_id + "<|vision_start|><|video_pad|><|vision_end|>")
            elif "text" in item:
                out.append(item["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


@dataclass
class Batch:
    """Model inputs for B left-padded conversations, plus what the lab shows about each upload."""
    input_ids: torch.Tensor                        # (B, L) long
    attention_mask: torch.Tensor                   # (B, L) long, 0 on left padding
    pixel_values: torch.Tensor | None = None       # (N_img_patches, 1176)
    image_grid_thw: torch.Tensor | None = None     # (n_images, 3)
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    media: list = field(default_factory=list)      # per image/video: sizes, grid, frames (for display)
    stop_token_ids: tuple = ()                     # <|im_end|>, <|endoftext|>: where generate stops

    def to(self, device, dtype=None) -> "Batch":
        """Move to a device; pixel tensors also to the model's dtype."""
        move = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt)
        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       pixel_values=move(self.pixel_values, dtype), image_grid_thw=move(self.image_grid_thw),
                       pixel_values_videos=move(self.pixel_values_videos, dtype),
                       video_grid_thw=move(self.video_grid_thw))


class Processor:
    """Chat messages -> Batch. Reads tokenizer.json (via `tokenizers`) and preprocessor_config.json."""

    def __init__(self, tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2,
                 temporal_patch_size=2, chat_template=None, video_pixels=None):
        self.tokenizer = tokenizer                 # a tokenizers.Tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        # Video defaults (min_pixels / max_pixels / total_pixels per read_video); {} = qwen-vl-utils' values.
        self.video_pixels = dict(video_pixels or {})
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.chat_template = chat_template         # the Jinja text, kept so `save` can write it back
        ids = {t: tokenizer.token_to_id(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|endoftext|>",
                                                     "<|im_end|>", "<|vision_start|>", "<|vision_end|>")}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks Qwen2-VL special tokens {[t for t, i in ids.items() if i is None]}")
        self.image_token_id, self.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        self.pad_token_id, self.eos_token_ids = ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]]

    @staticmethod
    def from_dir(path) -> "Processor":
        from tokenizers import Tokenizer
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise ValueError(f"checkpoint {path} has no tokenizer.json; copy it from the model's hub repository")
        cfg = json.loads((path / "preprocessor_config.json").read_text()) \
            if (path / "preprocessor_config.json").exists() else {}
        size = cfg.get("size") or {}
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text()) \
            if (path / "tokenizer_config.json").exists() else {}
        return Processor(Tokenizer.from_file(str(path / "tokenizer.json")),
                         min_pixels=cfg.get("min_pixels", size.get("shortest_edge", MIN_PIXELS)),
                         max_pixels=cfg.get("max_pixels", size.get("longest_edge", MAX_PIXELS)),
                         patch_size=cfg.get("patch_size", 14), merge_size=cfg.get("merge_size", 2),
                         temporal_patch_size=cfg.get("temporal_patch_size", 2),
                         chat_template=tok_cfg.get("chat_template"), video_pixels=cfg.get("video_pixels"))

    def encode_media(self, item: dict):
        """One image / video content item -> (pixel rows (N, 1176), grid (1, 3), display info)."""
        kw = dict(patch=self.patch_size, merge=self.merge_size, temporal=self.temporal_patch_size)
        if media_kind(item) == "video":
            opts = {**self.video_pixels, **{k: item[k] for k in ("fps", "nframes", "min_pixels", "max_pixels",
                                                                  "total_pixels", "max_frames") if k in item}}
            clip = video_io.read_video(item["video"], **opts)
            rows, grid = video_to_patches(clip.frames, **kw)
            info = {"kind": "video", "frames": len(clip.indices), "indices": clip.indices, "fps": clip.fps,
                    "pixels": clip.frames}                                  # (T, 3, h, w) uint8, resized
        else:
            image = load_image(item.get("image", item.get("image_url")))
            rows, grid = image_to_patches(image, item.get("min_pixels", self.min_pixels),
                                          item.get("max_pixels", self.max_pixels), **kw)
            info = {"kind": "image", "original_size": image.size, "image": image}
        g = grid[0].tolist()
        info.update(grid_thw=g, resized_size=(g[2] * self.patch_size, g[1] * self.patch_size),
                    tokens=g[0] * g[1] * g[2] // self.merge_size ** 2)
        return rows, grid, info

    def tokenize(self, messages, add_generation_prompt=True, add_vision_id=False):
        """One conversation -> (token ids with each placeholder expanded, [(rows, grid, info)] in prompt order)."""
        ids = self.tokenizer.encode(apply_chat_template(messages, add_generation_prompt, add_vision_id),
                                    add_special_tokens=False).ids
        media = [self.encode_media(it) for m in messages if not isinstance(m["content"], str)
                 for it in m["content"] if media_kind(it)]
        pad = {"image": self.image_token_id, "video": self.video_token_id}
        for kind, token in pad.items():        # user text may spell a placeholder out literally
            n_given = sum(e[2]["kind"] == kind for e in media)
            if ids.count(token) != n_given:
                raise ValueError(f"the prompt has {ids.count(token)} <|{kind}_pad|> tokens but {n_given} "
                                 f"{kind}(s) were given; remove the literal <|{kind}_pad|> text or add the {kind}")
        tokens = {kind: iter([e[2]["tokens"] for e in media if e[2]["kind"] == kind]) for kind in pad}
        kind_of = {token: kind for kind, token in pad.items()}
        out = []
        for t in ids:                          # one placeholder per merged patch: grid.prod() / 4
            out += [t] * next(tokens[kind_of[t]]) if t in kind_of else [t]
        return out, media

    def batch(self, conversations, add_generation_prompt=True, add_vision_id=False) -> Batch:
        """Several conversations -> one left-padded Batch (generation appends on the right)."""
        done = [self.tokenize(c, add_generation_prompt, add_vision_id) for c in conversations]
        L = max(len(ids) for ids, _ in done)
        input_ids = torch.full((len(done), L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(done), L), dtype=torch.long)
        for b, (ids, _) in enumerate(done):
            input_ids[b, L - len(ids):] = torch.tensor(ids)
            attention_mask[b, L - len(ids):] = 1
        media = [e for _, m in done for e in m]
        cat = lambda kind, i: torch.cat([e[i] for e in media if e[2]["kind"] == kind]) \
            if any(e[2]["kind"] == kind for e in media) else None
        return Batch(input_ids, attention_mask, cat("image", 0), cat("image", 1), cat("video", 0), cat("video", 1),
                     [e[2] for e in media], tuple(self.eos_token_ids))

    def __call__(self, messages, add_generation_prompt=True, add_vision_id=False) -> Batch:
        return self.batch([messages], add_generation_prompt, add_vision_id)

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
