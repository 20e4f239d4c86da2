"""Loading and saving checkpoints (safetensors only: no pickle is ever unpickled).

`load(source)` takes a local directory or a hub id (fetched by huggingface_hub into its normal cache;
HF_HUB_OFFLINE=1 uses the cached copy), reads single or sharded safetensors in either key layout — the
hub's original `visual.* / model.* / lm_head.*` or transformers >= 4.52's `model.visual.* /
model.language_model.*` — into a model built on the meta device (no second copy in memory), strictly.
`save` writes the hub layout, which transformers' from_pretrained reads.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Qwen2VLConfig
from .model import Qwen2VL
from .processor import CLIP_MEAN, CLIP_STD, QWEN2VL_CHAT_TEMPLATE, Processor

# transformers >= 4.52 module tree -> ours (= the hub checkpoint's names). Order matters: longest first.
KEY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def resolve(source) -> Path:
    """A local checkpoint directory, or a hub id downloaded (or found in the cache) by huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ValueError(f"model {source!r}: no such checkpoint directory; pass a directory with config.json "
                         "and *.safetensors, or a hub id like Qwen/Qwen2-VL-2B-Instruct")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline without a cached copy, unknown repo, no network ...
        raise ValueError(f"model {source!r} could not be fetched from the hub ({type(e).__name__}: {e}). "
                         "Download it on a connected machine with `hf download "
                         f"{source}` (the cache is reused offline), or pass a local directory") from None


def _tensor_files(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {path}: no *.safetensors files (pickle .bin checkpoints are not loaded; "
                         "convert them with safetensors first)")
    return files


def load(source, device=None, dtype=None):
    """-> (model, processor). Default device: CUDA when available; dtype: bf16 on CUDA, fp32 on CPU."""
    path = resolve(source)
    if not (path / "config.json").exists():
        raise ValueError(f"checkpoint {path}: config.json is missing")
    config = Qwen2VLConfig.from_dict(json.loads((path / "config.json").read_text()))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = Qwen2VL(config)                          # shapes only; real tensors come from the files
    expected = model.state_dict()
    tied = config.text.tie_word_embeddings
    state, unexpected = {}, []
    for file in _tensor_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = next((new + key[len(old):] for old, new in KEY_PREFIXES if key.startswith(old)), key)
                if name == "lm_head.weight" and tied:
                    continue                             # tied: the embedding matrix is used instead
                if name not in expected:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tensor.shape != expected[name].shape:
                    raise ValueError(f"checkpoint {path}: tensor {key} has shape {tuple(tensor.shape)}, the "
                                     f"config expects {tuple(expected[name].shape)}")
                state[name] = tensor.to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        listed = lambda what, keys: f"{what} {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})" if keys else ""
        raise ValueError(f"checkpoint {path} does not match its config.json: "
                         + "; ".join(filter(None, [listed("missing", missing), listed("unexpected", unexpected)]))
                         + ". Is the config from the same checkpoint?")
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), Processor.from_dir(path)


def save(model, processor, out_dir) -> Path:
    """Write a checkpoint in the hub layout. Written to a temporary folder first: nothing half-written."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out.parent))
    try:
        cfg = model.config
        dtype = next(model.parameters()).dtype
        (tmp / "config.json").write_text(json.dumps({
            # bos/eos written out: without them transformers falls back to Qwen's ids, outside a small vocabulary
            "bos_token_id": processor.pad_token_id, "eos_token_id": processor.eos_token_ids[0],
            **cfg.to_dict(), "torch_dtype": str(dtype)[6:]}, indent=2))
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                   if not (cfg.text.tie_word_embeddings and k == "lm_head.weight")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        processor.tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Qwen2Tokenizer", "chat_template": processor.chat_template or QWEN2VL_CHAT_TEMPLATE,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
            "model_max_length": cfg.text.max_position_embeddings}, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
            "min_pixels": processor.min_pixels, "max_pixels": processor.max_pixels,
            "size": {"shortest_edge": processor.min_pixels, "longest_edge": processor.max_pixels},
            "patch_size": processor.patch_size, "temporal_patch_size": processor.temporal_patch_size,
            "merge_size": processor.merge_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "do_convert_rgb": True,
            **({"video_pixels": processor.video_pixels} if processor.video_pixels else {})}, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({
            "eos_token_id": processor.eos_token_ids, "pad_token_id": processor.pad_token_id}, indent=2))
        if out.exists():                                  # swap in the finished folder, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=out.parent))
            os.replace(out, old / "ckpt")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
