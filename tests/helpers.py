"""Shared test helpers: a tiny tokenizer with the Qwen2-VL special tokens, tiny configs, HF oracles."""
import json
from pathlib import Path

import numpy as np
import torch

CORPUS = ["You are a helpful assistant.", "system", "user", "assistant", "Describe the image.",
          "What is in the video?", "Which picture is brighter?", "Hello! How are you today?"] * 20
# Videos in tests: keep small random frames at their size instead of the default 128-token minimum per frame.
VIDEO_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}


def make_tokenizer(vocab_size=384):
    """The lab's byte-level BPE recipe on a few sentences; Qwen2-VL special tokens after the vocabulary."""
    from lab.train import build_tokenizer
    return build_tokenizer(CORPUS, vocab_size)


def user(*content):
    return [{"role": "user", "content": list(content)}]


def image(img):
    return {"type": "image", "image": img}


def video(frames):
    return {"type": "video", "video": frames, **VIDEO_PIXELS}


def text(s):
    return {"type": "text", "text": s}


def token_ids(tok):
    return {k: tok.token_to_id(f"<|{k}|>") for k in ("image_pad", "video_pad", "vision_start", "vision_end")}


def hf_config_dict(tok, tied=True, layout="nested", variant="a"):
    """A tiny Qwen2-VL config.json dict in the hub flat layout or the transformers-v5 nested layout."""
    ids = token_ids(tok)
    if variant == "a":   # tied, GQA 2, head_dim 16, mrope [2, 3, 3]
        text = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                    max_position_embeddings=4096)
        vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, hidden_size=64)
        section = [2, 3, 3]
    else:                # untied, GQA 3, head_dim 16, mrope [4, 2, 2], deeper
        text = dict(vocab_size=420, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4,
                    max_position_embeddings=4096)
        vision = dict(depth=3, embed_dim=48, num_heads=3, mlp_ratio=2, hidden_size=96)
        section = [4, 2, 2]
    top = dict(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
               vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
               tie_word_embeddings=tied, model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
    text.update(bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    if layout == "flat":
        return {**top, **text, "rope_scaling": {"type": "mrope", "mrope_section": section},
                "vision_config": vision, "hidden_act": "silu"}
    return {**top, "text_config": {**text, "rope_parameters": {"rope_type": "default", "mrope_section": section,
                                                                   "rope_theta": text.pop("rope_theta")}},
            "vision_config": vision}


def make_hf_model(tok, seed=0, **kw):
    """A transformers Qwen2VLForConditionalGeneration with random weights (eager attention, fp32)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(**hf_config_dict(tok, **kw))
    cfg._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # random init is small; larger weights make differences visible
        for name, p in model.named_parameters():
            if "norm" not in name and "ln_q" not in name:
                p.normal_(0, 0.1 if p.ndim > 1 else 0.05)
    return model


def write_checkpoint_extras(tok, path, min_pixels=56 * 56, max_pixels=28 * 28 * 64):
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": min_pixels, "max_pixels": max_pixels,
                                                              "patch_size": 14, "merge_size": 2,
                                                              "temporal_patch_size": 2}))


def random_image(w, h, seed=0, mode="RGB"):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
    return img if mode in ("RGB", "RGBA") else img.convert(mode)


def mm_token_type_ids(input_ids, cfg):
    return (input_ids == cfg["image_token_id"]).long() + 2 * (input_ids == cfg["video_token_id"]).long()
