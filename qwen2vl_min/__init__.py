"""qwen2vl_min — a minimal, readable Qwen2-VL: exact against transformers, fast on a GPU.

Data flow (one file per stage): processor.py (+ video.py) -> vision.py -> model.py -> language.py
-> generate.py; rope.py holds the position maths, weights.py loads and saves checkpoints.
"""
from . import config, processor, rope, video, weights  # noqa: F401
from .config import PRESETS, Qwen2VLConfig, TextConfig, VisionConfig
from .generate import decode_step, generate, prefill, sample, stream_text
from .language import KVCache
from .model import Qwen2VL
from .processor import Batch, Processor
from .weights import load, save

__all__ = ["load", "save", "generate", "prefill", "decode_step", "sample", "stream_text", "Qwen2VL",
           "Qwen2VLConfig", "TextConfig", "VisionConfig", "PRESETS", "Processor", "Batch", "KVCache"]
