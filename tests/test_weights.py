"""Checkpoint loading and saving: both key layouts, shards, tied embeddings, strict errors, the hub path,
and a save -> transformers from_pretrained round trip with equal logits."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen2vl_min as q
from helpers import mm_token_type_ids, random_image, write_checkpoint_extras


def _prompt(processor):
    return processor([{"role": "user", "content": [{"type": "image", "image": random_image(90, 70, 3)},
                                                   {"type": "text", "text": "Describe the image."}]}])


def _logits(model, b):
    return model(b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw)


def _module_tree_layout(pair, out, shards=1):
    """Rewrite the checkpoint (transformers 5.23 saves the hub's names, visual.* / model.*) with the module-tree
    names that transformers 4.52-4.57 wrote (model.visual.* / model.language_model.*), optionally sharded."""
    sd = load_file(str(pair.path / "model.safetensors"))
    assert any(k.startswith("visual.") for k in sd) and any(k.startswith("model.layers.") for k in sd)
    renamed = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
               for k, v in sd.items()}
    assert any(k.startswith("model.visual.") for k in renamed)
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    keys = sorted(renamed)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {k: renamed[k] for k in keys[s::shards]}
        save_file(part, str(out / name))
        weight_map.update({k: name for k in part})
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text((pair.path / "config.json").read_text())
    write_checkpoint_extras(pair.processor.tokenizer, out)
    return out


def test_both_key_layouts_and_shards_give_the_same_logits(pair, tmp_path):
    b = _prompt(pair.processor)
    ref = _logits(pair.model, b)                                   # loaded from the hub layout
    for shards in (1, 3):
        d = tmp_path / f"tree{shards}"
        d.mkdir()
        model, _ = q.load(_module_tree_layout(pair, d, shards), device="cpu")
        torch.testing.assert_close(_logits(model, b), ref, rtol=0, atol=0)
    assert not any(p.is_meta for p in model.parameters())


def test_tied_embeddings_share_one_tensor(pair):
    tied = pair.cfg["tie_word_embeddings"]
    same = pair.model.lm_head.weight.data_ptr() == pair.model.model.embed_tokens.weight.data_ptr()
    assert same == tied


def test_save_roundtrip_through_transformers(pair, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration
    out = q.save(pair.model, pair.processor, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "preprocessor_config.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    keys = load_file(str(out / "model.safetensors")).keys()
    assert all(k.split(".")[0] in ("visual", "model", "lm_head") for k in keys)      # hub layout
    assert ("lm_head.weight" in keys) != pair.cfg["tie_word_embeddings"]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    b = _prompt(pair.processor)
    with torch.no_grad():
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                    image_grid_thw=b.image_grid_thw, mm_token_type_ids=mm_token_type_ids(b.input_ids, pair.cfg)).logits
    torch.testing.assert_close(_logits(pair.model, b), theirs, rtol=0, atol=1e-4)
    assert hf.config.text_config.eos_token_id == pair.processor.eos_token_ids[0]      # not Qwen's 151645 default
    ours, processor = q.load(out, device="cpu")                   # and back into ours
    torch.testing.assert_close(_logits(ours, b), _logits(pair.model, b), rtol=0, atol=0)
    assert processor.max_pixels == pair.processor.max_pixels


def test_save_overwrites_atomically(pair_a, tmp_path):
    out = q.save(pair_a.model, pair_a.processor, tmp_path / "ck")
    (out / "stale.txt").write_text("old")
    q.save(pair_a.model, pair_a.processor, out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]          # no temporary folders left behind


def _copy(pair, tmp_path, edit):
    d = tmp_path / "edited"
    d.mkdir(parents=True)
    sd = load_file(str(pair.path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text((pair.path / "config.json").read_text())
    write_checkpoint_extras(pair.processor.tokenizer, d)
    return d


def test_missing_unexpected_and_misshapen_tensors_are_named(pair_a, tmp_path):
    d = _copy(pair_a, tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        q.load(d, device="cpu")
    d = _copy(pair_a, tmp_path / "x", lambda sd: sd.update({"visual.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected \['visual.extra.weight'\]"):
        q.load(d, device="cpu")
    d = _copy(pair_a, tmp_path / "y", lambda sd: sd.update({"visual.merger.mlp.2.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"visual.merger.mlp.2.bias has shape \(3,\)"):
        q.load(d, device="cpu")


def test_bad_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        q.load(tmp_path / "nope")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="missing required key"):
        q.load(tmp_path / "bin")
    _offline_cache(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(ValueError, match="(?s)could not be fetched from the hub.*hf download"):
        q.load("Qwen/Qwen2-VL-2B-Instruct")


def _offline_cache(monkeypatch, cache):
    """HF_HUB_OFFLINE=1 with a private cache (huggingface_hub reads its env once, at import: patch both)."""
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache), raising=False)


def test_pickle_checkpoints_are_refused(pair_a, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((pair_a.path / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        q.load(d, device="cpu")


def test_hub_id_uses_the_huggingface_cache_offline(pair_a, tmp_path, monkeypatch):
    """The real hub path: a snapshot in huggingface_hub's cache layout is found with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub" / "models--lab--tiny"
    snap = cache / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in pair_a.path.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0" * 40)
    _offline_cache(monkeypatch, tmp_path / "hub")
    model, _ = q.load("lab/tiny", device="cpu")
    b = _prompt(pair_a.processor)
    torch.testing.assert_close(_logits(model, b), _logits(pair_a.model, b), rtol=0, atol=0)


def test_command_line_demo_streams_an_answer(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "tests/make_checkpoint.py", str(out)], check=True)
    r = subprocess.run([sys.executable, "-m", "qwen2vl_min", "--model", str(out), "--image", str(out / "example.png"),
                        "--prompt", "Describe the image.", "--max-new-tokens", "5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[image: grid_thw [1, 12, 16], 48 visual tokens]" in r.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    r = subprocess.run([sys.executable, "-m", "qwen2vl_min", "--model", str(out), "--image", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot be read as an image" in r.stderr and "Traceback" not in r.stderr


def test_package_stays_within_its_line_budget():
    from pathlib import Path
    files = sorted(Path(q.__file__).parent.glob("*.py"))
    lines = {f.name: len(f.read_text().splitlines()) for f in files}
    assert sum(lines.values()) <= 1400, lines
    assert max(lines.values()) <= 280, lines


def test_package_never_imports_the_oracle_or_the_lab():
    from pathlib import Path
    for f in Path(q.__file__).parent.glob("*.py"):
        for line in f.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                assert not any(w in stripped.split()[1] for w in ("transformers", "torchvision", "qwen_vl_utils")) \
                    and stripped.split()[1] != "lab", f"{f.name}: {stripped}"
