"""Parity of qwen2vl_min with transformers (the oracle) on the same random weights, both tiny configs.

Everything is fp32 on CPU; logits must agree to max |delta| <= 1e-4 on every real (unpadded) position.
transformers v5 needs `mm_token_type_ids` whenever visual inputs are passed (lab.notebook.hf_inputs).
"""
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

import qwen2vl_min as q
from lab.notebook import hf_inputs
from helpers import VIDEO_PIXELS, image, mm_token_type_ids, random_image, text, user, video  # noqa: F401
from qwen2vl_min.rope import mrope_position_ids

TOL = 1e-4
N_NEW = 20


# ---------------------------------------------------------------- inputs (tiny, so the file stays fast)
# Images use the fixture checkpoints' pixel limits (56*56 .. 28*28*64 px, i.e. 4 .. 64 tokens).
IMG_WIDE = random_image(84, 56, seed=1)          # -> grid (1, 4, 6): 6 tokens
IMG_TALL = random_image(56, 140, seed=2)         # -> grid (1, 10, 4): 10 tokens, other aspect ratio
IMG_BIG = random_image(300, 200, seed=3)         # capped by max_pixels -> resized, <= 64 tokens
IMG_SQUARE = random_image(112, 112, seed=7)      # -> grid (1, 8, 8): 16 tokens
# Videos: small random frames; per-item pixel limits keep the frames at their size (84x112 -> grid 6x8)
# instead of the video default minimum of 128 tokens per frame.
FRAMES_5 = [random_image(112, 84, seed=20 + i) for i in range(5)]    # odd: padded to 6 -> grid_t 3
FRAMES_4 = [random_image(84, 56, seed=40 + i) for i in range(4)]     # -> grid (2, 4, 6)


CONVS = {
    "text": user(text("Hello! How are you today?")),
    "image": user(image(IMG_WIDE), text("Describe the image.")),
    "two_images": user(image(IMG_TALL), image(IMG_BIG), text("Which picture is brighter?")),
    "video": user(video(FRAMES_5), text("What is in the video?")),
    "image_video": user(image(IMG_TALL), video(FRAMES_4), text("What is in the video?")),
}
# Prompts chosen so that greedy decoding of the random models is not a constant token (a stronger check).
PADDED = [user(image(IMG_TALL), text("What is in the video?")),
          user(image(IMG_SQUARE), text("Which picture is brighter? Hello! How are you today?"))]
GEN_CONV = user(image(IMG_SQUARE), text("Which picture is brighter? Hello! How are you today?"))


# ---------------------------------------------------------------- helpers
def hf_kwargs(pair, b):
    """The Batch as transformers' keyword arguments (the same packing chapter 10 of the notebooks uses)."""
    return hf_inputs(b, SimpleNamespace(**pair.cfg))


@torch.no_grad()
def hf_logits(pair, b, position_ids=None):
    pair.hf.model.rope_deltas = None          # no stale state from an earlier generate
    return pair.hf(**hf_kwargs(pair, b), position_ids=position_ids).logits


@torch.no_grad()
def our_logits(pair, b, **kw):
    return pair.model(b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw, b.pixel_values_videos,
                      b.video_grid_thw, **kw)


def max_diff_unpadded(ours, theirs, attention_mask):
    assert ours.shape == theirs.shape
    keep = attention_mask.bool()
    return (ours[keep] - theirs[keep]).abs().max().item()


def extend(b, tokens):
    """The batch with generated tokens (B, n) appended on the right (attention 1), pixels unchanged."""
    from dataclasses import replace
    return replace(b, input_ids=torch.cat([b.input_ids, tokens], 1),
                   attention_mask=torch.cat([b.attention_mask, torch.ones_like(tokens)], 1))


# ---------------------------------------------------------------- 1. logits
@pytest.mark.parametrize("case", list(CONVS))
def test_logits_match_transformers(pair, case):
    b = pair.processor(CONVS[case])
    if case == "two_images":
        assert b.image_grid_thw.shape[0] == 2 and b.image_grid_thw[0].tolist() != b.image_grid_thw[1].tolist()
    if "video" in case:
        assert b.video_grid_thw[0, 0] >= 2            # several temporal patches
    ours, theirs = our_logits(pair, b), hf_logits(pair, b)
    assert ours.shape == (1, b.input_ids.shape[1], pair.cfg.get("text_config", pair.cfg)["vocab_size"])
    assert max_diff_unpadded(ours, theirs, b.attention_mask) <= TOL


def test_logits_match_transformers_left_padded_batch(pair):
    # Both rows hold an image, so transformers computes its own M-RoPE positions from the attention mask
    # (get_rope_index skips padding); only unpadded positions are compared.
    b = pair.processor.batch(PADDED)
    lengths = b.attention_mask.sum(1).tolist()
    assert lengths[0] < lengths[1] and b.attention_mask[0, 0] == 0
    ours, theirs = our_logits(pair, b), hf_logits(pair, b)
    assert max_diff_unpadded(ours, theirs, b.attention_mask) <= TOL
    # Each row of the batch also equals the same conversation run alone.
    for i, conv in enumerate(PADDED):
        alone = our_logits(pair, pair.processor(conv))[0]
        assert (ours[i, -lengths[i]:] - alone).abs().max().item() <= TOL


def test_logits_match_transformers_left_padded_text_only(pair):
    # Without visual inputs transformers v5 uses arange positions that count the pads, so we pass it OUR
    # position_ids explicitly (and check they are the unpadded token index on all three rows).
    convs = [user(text("Hello!")), user(text("Which picture is brighter? Describe the image."))]
    b = pair.processor.batch(convs)
    assert b.attention_mask[0, 0] == 0
    pos, _ = mrope_position_ids(b.input_ids, None, None, b.attention_mask, pair.model.config)
    for i in range(2):
        keep = b.attention_mask[i].bool()
        assert torch.equal(pos[:, i, keep], torch.arange(int(keep.sum())).expand(3, -1))
    ours, theirs = our_logits(pair, b), hf_logits(pair, b, position_ids=pos)
    assert max_diff_unpadded(ours, theirs, b.attention_mask) <= TOL


# ---------------------------------------------------------------- 2. greedy generation
def hf_generate(pair, b):
    # transformers fills every None of the passed GenerationConfig from model.generation_config (whose
    # eos_token_id is <|im_end|>), and then pads a finished row with pad_token_id. So the model's own
    # eos_token_id is cleared for the call; with stop_token_ids=[] for ours both run exactly N_NEW tokens.
    gc = GenerationConfig(do_sample=False, max_new_tokens=N_NEW, eos_token_id=None,
                          pad_token_id=pair.processor.pad_token_id)
    saved = pair.hf.generation_config.eos_token_id
    pair.hf.generation_config.eos_token_id = None
    pair.hf.model.rope_deltas = None
    try:
        with torch.no_grad():
            out = pair.hf.generate(**hf_kwargs(pair, b), generation_config=gc)
    finally:
        pair.hf.generation_config.eos_token_id = saved
    return out[:, b.input_ids.shape[1]:].tolist()


def test_greedy_generation_matches_transformers(pair):
    b = pair.processor(GEN_CONV)
    ours = list(q.generate(pair.model, b, N_NEW, stop_token_ids=[]))
    assert all(isinstance(t, int) for t in ours)
    theirs = hf_generate(pair, b)[0]
    assert len(theirs) == N_NEW
    assert ours == theirs


def test_greedy_generation_matches_transformers_left_padded_batch(pair):
    b = pair.processor.batch(PADDED)
    steps = list(q.generate(pair.model, b, N_NEW, stop_token_ids=[]))
    assert len(steps) == N_NEW and all(isinstance(s, list) and len(s) == 2 for s in steps)
    ours = [list(row) for row in zip(*steps)]
    assert ours == hf_generate(pair, b)


# ---------------------------------------------------------------- 3. vision tower
@pytest.mark.parametrize("kind", ["images", "video"])
def test_vision_tower_matches_transformers(pair, kind):
    if kind == "images":     # two images of different grids in one call: per-image attention blocks
        b = pair.processor(CONVS["two_images"])
        pv, grid = b.pixel_values, b.image_grid_thw
    else:                    # several temporal patches: per-temporal-patch attention blocks
        b = pair.processor(CONVS["video"])
        pv, grid = b.pixel_values_videos, b.video_grid_thw
    with torch.no_grad():
        ours = pair.model.visual(pv, grid)
        theirs = pair.hf.model.visual(pv, grid_thw=grid).pooler_output
    assert ours.shape == (int(grid.prod(-1).sum()) // 4, theirs.shape[-1])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


# ---------------------------------------------------------------- 4. KV cache
@pytest.mark.parametrize("which", ["single", "padded"])
def test_kv_cache_decode_matches_full_forward(pair, which):
    b = pair.processor(CONVS["image_video"]) if which == "single" else pair.processor.batch(PADDED)
    B, L = b.input_ids.shape
    n = 6
    cache = q.KVCache(pair.model.config.text, B, L + n)
    mask = torch.ones(B, L + n, dtype=torch.long)
    mask[:, :L] = b.attention_mask
    with torch.no_grad():
        logits, deltas = q.prefill(pair.model, b, cache)
        steps, tokens = [logits], []
        for k in range(n):
            token = logits.argmax(-1)                                    # (B,) greedy, as generate does
            tokens.append(token)
            logits = q.decode_step(pair.model, token[:, None], mask[:, :L + k + 1], cache, L + k, deltas)
            steps.append(logits)
    steps = torch.stack(steps, 1)                                        # (B, n + 1, V)
    full = extend(b, torch.stack(tokens, 1))                             # prompt + n generated tokens

    # The positions generate uses: the prompt's M-RoPE ids, then cache index + rope_delta on all rows ...
    prompt_pos, _ = mrope_position_ids(b.input_ids, b.image_grid_thw, b.video_grid_thw, b.attention_mask,
                                       pair.model.config)
    new_pos = (torch.arange(L, L + n)[None] + deltas).expand(3, B, n)
    pos = torch.cat([prompt_pos, new_pos], 2)
    # ... which is what the M-RoPE rule gives for the whole sequence (text continues at max + 1).
    full_pos, _ = mrope_position_ids(full.input_ids, full.image_grid_thw, full.video_grid_thw,
                                     full.attention_mask, pair.model.config)
    keep = full.attention_mask.bool()
    for i in range(B):
        assert torch.equal(pos[:, i, keep[i]], full_pos[:, i, keep[i]])

    ref = our_logits(pair, full, position_ids=pos)[:, L - 1:]            # logits that predict the same tokens
    assert (steps - ref).abs().max().item() <= TOL
    # and the oracle agrees on the same full sequence
    assert (steps - hf_logits(pair, full)[:, L - 1:]).abs().max().item() <= TOL


# ---------------------------------------------------------------- 5. placeholder / feature mismatch
@pytest.mark.parametrize("change", [+1, -1])
def test_placeholder_feature_mismatch_raises(pair, change):
    b = pair.processor(user(image(IMG_SQUARE), text("Describe the image.")))
    img_id = pair.cfg["image_token_id"]
    ids = b.input_ids[0].tolist()
    n = ids.count(img_id)
    assert n == 16
    last = len(ids) - 1 - ids[::-1].index(img_id)                       # the last <|image_pad|>
    ids = ids[:last] + [img_id] * 2 + ids[last + 1:] if change > 0 else ids[:last] + ids[last + 1:]
    input_ids = torch.tensor([ids])
    with pytest.raises(ValueError) as err:
        with torch.no_grad():
            pair.model(input_ids, torch.ones_like(input_ids), b.pixel_values, b.image_grid_thw)
    msg = str(err.value)
    assert re.search(rf"\b{n + change}\b", msg) and re.search(rf"\b{n}\b", msg), msg
