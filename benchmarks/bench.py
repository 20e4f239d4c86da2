"""Side by side: qwen2vl_min against transformers' Qwen2VLForConditionalGeneration on the same random weights.

One process, both models loaded with identical weights (speed does not depend on their values). It first checks
that both produce the same greedy tokens, then times each metric with warm-up, device synchronisation and the
median of --iters runs, alternating the two implementations run by run. Results are printed as a table and
appended to benchmarks/RESULTS.md with the hardware and the versions.

    python benchmarks/bench.py                      # GPU: the 2B and 7B configs in bf16; CPU: the small config
    python benchmarks/bench.py --config tiny --iters 1 --no-save   # the CI smoke run
"""
import argparse
import datetime
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import qwen2vl_min as q
from qwen2vl_min.config import PRESETS, Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_min.processor import image_to_patches, video_to_patches

RESULTS = Path(__file__).with_name("RESULTS.md")
# Qwen2-VL's special token ids (REFERENCE 1.4); small configs keep them by placing them at the top of the vocabulary.
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151644, 151645, 151652, 151653, 151655, 151656
CONFIGS = {
    "tiny": Qwen2VLConfig(TextConfig(151936, 64, 128, 2, 4, 2, mrope_section=(2, 3, 3), max_position_embeddings=4096),
                          VisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=64)),
    "small": Qwen2VLConfig(TextConfig(151936, 512, 1536, 8, 8, 2, mrope_section=(8, 12, 12), tie_word_embeddings=True),
                           VisionConfig(depth=8, embed_dim=256, num_heads=4, hidden_size=512)),
    "2B": PRESETS["2B"], "7B": PRESETS["7B"],
}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}       # HBM bytes/s (SXM parts)


def inputs(kind: str, tiny: bool):
    """(input_ids (1, L), pixel tensors) for a prompt with one image or video and a short question."""
    if kind == "video":                # a 10 s 640x360 clip at 2 fps = 20 frames (the sampler's output)
        frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (20, 3, 364, 644), dtype=np.uint8))
        rows, grid = video_to_patches(frames[:4, :, :56, :84] if tiny else frames)
        pad = VIDEO_PAD
    else:
        side = {"image1024": 1024, "image448": 448}[kind] // (8 if tiny else 1)
        img = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
        rows, grid = image_to_patches(img, max_pixels=12845056)
        pad = IMAGE_PAD
    n = int(grid.prod()) // 4
    ids = [IM_START, 872, 198, VISION_START] + [pad] * n + [VISION_END, 74785, 419, 13, IM_END, 198, IM_START,
                                                           77091, 198]
    return torch.tensor([ids]), rows, grid


def build(config: Qwen2VLConfig, device, dtype):
    """Ours and transformers' with the same random weights (transformers' module tree = ours renamed)."""
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = q.Qwen2VL(config)
    ours = ours.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if "norm" in name or "ln_" in name else 0.0)
    if config.text.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    hf_cfg = HFConfig(**config.to_dict())
    with torch.device(device):
        theirs = Qwen2VLForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    renamed = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
                if k.startswith("model.") else k): v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(renamed, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if config.text.tie_word_embeddings:
        theirs.lm_head.weight = theirs.model.language_model.embed_tokens.weight
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    return ours.eval(), theirs.eval()


class Peak:
    """Peak memory of a block: CUDA max allocated, or on CPU the resident set size sampled every 2 ms."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base, self.peak, self.stop = self._rss(), 0, False
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop = True
            self.thread.join()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def runners(ours, theirs, ids, rows, grid, kind, device, compile_ours):
    """name -> (ours, theirs) callables for one prompt."""
    video = kind == "video"
    batch = q.Batch(ids.to(device), torch.ones_like(ids).to(device), None if video else rows.to(device),
                    None if video else grid.to(device), rows.to(device) if video else None,
                    grid.to(device) if video else None, stop_token_ids=())
    dtype = next(ours.parameters()).dtype
    batch = batch.to(device, dtype)
    hf_in = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "mm_token_type_ids": (batch.input_ids == IMAGE_PAD).long() + 2 * (batch.input_ids == VIDEO_PAD).long(),
             ("pixel_values_videos" if video else "pixel_values"): rows.to(device, dtype),
             ("video_grid_thw" if video else "image_grid_thw"): grid.to(device)}

    def ours_gen(n, b=1):
        rep = lambda t: None if t is None else torch.cat([t] * b)            # b copies of the prompt
        bb = q.Batch(batch.input_ids.repeat(b, 1), batch.attention_mask.repeat(b, 1), rep(batch.pixel_values),
                     rep(batch.image_grid_thw), rep(batch.pixel_values_videos), rep(batch.video_grid_thw))
        with torch.inference_mode():
            return list(q.generate(ours, bb, n, stop_token_ids=[], compile=compile_ours))

    def theirs_gen(n, b=1):
        kw = {k: (v.repeat(b, 1) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else
                  torch.cat([v] * b)) for k, v in hf_in.items()}
        with torch.inference_mode():
            return theirs.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    vis = (batch.pixel_values_videos if video else batch.pixel_values, grid.to(device))
    with torch.inference_mode():
        return {
            "vision encoder (s)": (lambda: ours.visual(*vis), lambda: theirs.model.visual(vis[0], grid_thw=vis[1])),
            "time to first token (s)": (lambda: ours_gen(1), lambda: theirs_gen(1)),
            "_gen": (ours_gen, theirs_gen),
        }


def measure(config_name, device, dtype, iters, decode_tokens, compile_ours):
    config = CONFIGS[config_name]
    tiny = config_name == "tiny"
    ours, theirs = build(config, device, dtype)
    rows = {}
    check = None
    for kind in ("image1024", "image448", "video"):
        ids, pv, grid = inputs(kind, tiny)
        run = runners(ours, theirs, ids, pv, grid, kind, device, compile_ours)
        gen_ours, gen_theirs = run.pop("_gen")
        if kind == "image448":             # same greedy tokens first, then the decode metrics on this prompt
            a = gen_ours(16)
            b = gen_theirs(16)[0, ids.shape[1]:].tolist()       # (1, L + 16) -> the 16 new tokens
            check = (a == b, a, b)
            if not check[0]:
                raise SystemExit(f"greedy tokens differ: ours {a} vs transformers {b}")
        for metric, (f_ours, f_theirs) in run.items():
            with torch.inference_mode():
                f_ours(), f_theirs()                                    # warm-up (and compilation)
                samples = {"ours": [], "transformers": []}
                for _ in range(iters):                                  # interleaved
                    for name, f in (("ours", f_ours), ("transformers", f_theirs)):
                        samples[name].append(timed(f, device)[0])
            rows[f"{metric} [{kind}]"] = {k: statistics.median(v) for k, v in samples.items()}
        if kind == "image448":
            for b in (1, 8):               # decode rate = (n - 1) tokens / (time for n tokens - time for 1)
                full, first, peaks = {"ours": [], "transformers": []}, {"ours": [], "transformers": []}, {}
                gen_ours(2, b), gen_theirs(2, b)
                for i in range(iters):
                    for name, g in (("ours", gen_ours), ("transformers", gen_theirs)):
                        with Peak(device) as pk:
                            full[name].append(timed(lambda: g(decode_tokens, b), device)[0])
                        first[name].append(timed(lambda: g(1, b), device)[0])
                        peaks[name] = max(peaks.get(name, 0), pk.peak)
                rate = {k: b * (decode_tokens - 1) / (statistics.median(full[k]) - statistics.median(first[k]))
                        for k in full}
                rows[f"decode tokens/s, batch {b} [{kind}]"] = {k: v if v > 0 else float("nan") for k, v in rate.items()}
                if b == 1:
                    rows[f"peak memory GB, batch 1 [{kind}]"] = {k: v / 1e9 for k, v in peaks.items()}
    compile_s = None
    if compile_ours and device.type == "cuda":
        torch._dynamo.reset()
        ids, pv, grid = inputs("image448", tiny)
        gen_ours = runners(ours, theirs, ids, pv, grid, "image448", device, True)["_gen"][0]
        compile_s = timed(lambda: gen_ours(8), device)[0] - timed(lambda: gen_ours(8), device)[0]
    lm_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if not n.startswith("visual"))
    return rows, check, compile_s, lm_bytes


def hardware(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {torch.get_num_threads()} threads"


def report(config_name, device, dtype, rows, check, compile_s, lm_bytes):
    lines = [f"### {config_name} config, {str(dtype)[6:]}, {hardware(device)}",
             f"{datetime.date.today()}; torch {torch.__version__}, transformers "
             f"{__import__('transformers').__version__}, Python {platform.python_version()}; "
             f"`{' '.join(['python'] + sys.argv)}`; greedy tokens identical: {check[0]}", "",
             "| metric | qwen2vl_min | transformers (sdpa) | ours / theirs |", "|---|---|---|---|"]
    for metric, v in rows.items():
        lines.append(f"| {metric} | {v['ours']:.4g} | {v['transformers']:.4g} | {v['ours'] / v['transformers']:.2f} |")
    bw = next((b for k, b in BANDWIDTH.items() if k in hardware(device)), None)
    if bw:
        tps = rows["decode tokens/s, batch 1 [image448]"]
        lines.append(f"| decode roofline fraction, batch 1 | {lm_bytes * tps['ours'] / bw:.1%} | "
                     f"{lm_bytes * tps['transformers'] / bw:.1%} | |")
    if compile_s is not None:
        lines.append(f"| compile time (s) | {compile_s:.1f} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=list(CONFIGS), action="append", help="default: 2B and 7B on GPU, small on CPU")
    p.add_argument("--iters", type=int, default=5, help="timed runs per metric and implementation (median)")
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="time our compiled decode step (CUDA graphs)")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in a.config or (["2B", "7B"] if device.type == "cuda" else ["small"]):
        rows, check, compile_s, lm_bytes = measure(name, device, dtype, a.iters, a.decode_tokens, a.compile)
        text = report(name, device, dtype, rows, check, compile_s, lm_bytes)
        print(text)
        if not a.no_save:
            with RESULTS.open("a") as f:
                f.write("\n" + text)
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
