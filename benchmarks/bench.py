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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import qwen2vl_min as q
from qwen2vl_min.config import PRESETS, Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_min.processor import image_to_patches, video_to_patches

RESULTS = Path(__file__).with_name("RESULTS.md")
# Qwen2-VL's ids of <|im_start|> / <|im_end|> (REFERENCE 1.4); the configs carry the vision token ids.
IM_START, IM_END = 151644, 151645
CONFIGS = {
    "tiny": Qwen2VLConfig(TextConfig(151936, 64, 128, 2, 4, 2, mrope_section=(2, 3, 3), max_position_embeddings=4096),
                          VisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=64)),
    "small": Qwen2VLConfig(TextConfig(151936, 512, 1536, 8, 8, 2, mrope_section=(8, 12, 12), tie_word_embeddings=True),
                           VisionConfig(depth=8, embed_dim=256, num_heads=4, hidden_size=512)),
    # the lab's nano-sized model with Qwen's vocabulary replaced by a 1k one: decode is then bound by per-token
    # overhead rather than by reading a 151,936-row output matrix, so this is where implementations differ on CPU
    "nano": Qwen2VLConfig(TextConfig(1024, 256, 768, 4, 8, 4, rope_theta=1e4, mrope_section=(4, 6, 6)),
                          VisionConfig(depth=4, embed_dim=128, num_heads=4, hidden_size=256),
                          image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003),
    "2B": PRESETS["2B"], "7B": PRESETS["7B"],
}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}       # HBM bytes/s (SXM parts)


def cpu_matvec_bandwidth(mbytes=256, runs=5) -> float:
    """Bytes/s that one large fp32 matrix-vector product reads on this CPU: the ceiling of a decode step,
    which is a chain of matrix-vector products (a CPU has no published figure like a GPU's HBM bandwidth)."""
    w, x = torch.randn(mbytes * 2**20 // 4 // 1024, 1024), torch.randn(1, 1024)
    x @ w.T                                                            # warm-up: page in the matrix
    best = min(timed(lambda: x @ w.T, torch.device("cpu"))[0] for _ in range(runs))
    return w.numel() * 4 / best


def inputs(kind: str, tiny: bool, config: Qwen2VLConfig):
    """(input_ids (1, L), pixel rows, grid) for a prompt with one image or video and a short question."""
    if kind == "video":                # a 10 s 640x360 clip at 2 fps = 20 frames (the sampler's output)
        frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (20, 3, 364, 644), dtype=np.uint8))
        rows, grid = video_to_patches(frames[:4, :, :56, :84] if tiny else frames)
        pad = config.video_token_id
    else:
        side = {"image1024": 1024, "image448": 448}[kind] // (8 if tiny else 1)
        img = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
        rows, grid = image_to_patches(img, max_pixels=12845056)
        pad = config.image_token_id
    V = config.text.vocab_size
    t = lambda i: i if i < V else V - 1 - i % 16          # Qwen's ids, folded into a small vocabulary
    text = [t(i) for i in (74785, 419, 13, IM_END, 198, IM_START, 77091, 198)]   # "Describe this.", assistant turn
    ids = [t(IM_START), t(872), t(198), config.vision_start_token_id] + [pad] * (int(grid.prod()) // 4) \
        + [config.vision_end_token_id] + text
    return torch.tensor([ids]), rows, grid


def build(config: Qwen2VLConfig, device, dtype, only=None):
    """Ours and transformers' with the same random weights (transformers' module tree = ours renamed).
    only="transformers" builds theirs alone (random weights of its own): for the memory measurement."""
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    # Random weights generate no natural end: no bos/eos (Qwen's 151643/151645 lie outside a small vocabulary).
    hf_cfg = HFConfig(**config.to_dict(), bos_token_id=None, eos_token_id=None)
    if only == "transformers":
        with torch.device(device):
            theirs = Qwen2VLForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
        theirs.generation_config.eos_token_id, theirs.generation_config.pad_token_id = None, 0
        return None, theirs.eval()
    with torch.device("meta"):
        ours = q.Qwen2VL(config)
    ours = ours.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if "norm" in name or "ln_" in name else 0.0)
    if config.text.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    if only == "ours":
        return ours.eval(), None
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


def peak_rss_child(config_name: str, impl: str, decode_tokens: int) -> int:
    """CPU peak memory: a fresh process builds only `impl`, generates on the 448x448 prompt, reports VmHWM."""
    code = ("import sys; sys.argv = ['bench']; sys.path.insert(0, %r); import bench; "
            "print(bench.rss_of(%r, %r, %d))" % (str(Path(__file__).parent), config_name, impl, decode_tokens))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def rss_of(config_name, impl, decode_tokens):
    config, device = CONFIGS[config_name], torch.device("cpu")
    ours, theirs = build(config, device, torch.float32, only=impl)
    ids, pv, grid = inputs("image448", config_name == "tiny", config)
    runners(ours, theirs, ids, pv, grid, "image448", device, False)["_gen"][0 if impl == "ours" else 1](decode_tokens)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def theirs_options(mode: str) -> dict:
    """transformers' generate options: its default (dynamic cache, eager), or its static cache + torch.compile
    (auto-compiled on CUDA; on CPU it must be asked for with CompileConfig's all-devices switch)."""
    if mode == "default":
        return {}
    from transformers import CompileConfig
    config = CompileConfig()
    config._compile_all_devices = True           # a class attribute, not an argument, in transformers 5.23
    return {"cache_implementation": "static", "compile_config": config}


def runners(ours, theirs, ids, rows, grid, kind, device, compile_ours, theirs_mode="default"):
    """name -> (ours, theirs) callables for one prompt."""
    video = kind == "video"
    batch = q.Batch(ids.to(device), torch.ones_like(ids).to(device), None if video else rows.to(device),
                    None if video else grid.to(device), rows.to(device) if video else None,
                    grid.to(device) if video else None, stop_token_ids=())
    model = ours if ours is not None else theirs        # (the memory measurement builds only one)
    dtype = next(model.parameters()).dtype
    batch = batch.to(device, dtype)
    hf_in = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "mm_token_type_ids": (batch.input_ids == model.config.image_token_id).long()
             + 2 * (batch.input_ids == model.config.video_token_id).long(),
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
            return theirs.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   **theirs_options(theirs_mode))

    vis = (batch.pixel_values_videos if video else batch.pixel_values, grid.to(device))
    return {"vision encoder (s)": (lambda: ours.visual(*vis), lambda: theirs.model.visual(vis[0], grid_thw=vis[1])),
            "time to first token (s)": (lambda: ours_gen(1), lambda: theirs_gen(1)),
            "_gen": (ours_gen, theirs_gen)}


def measure(config_name, device, dtype, iters, decode_tokens, compile_ours, theirs_mode="default"):
    config = CONFIGS[config_name]
    tiny = config_name == "tiny"
    ours, theirs = build(config, device, dtype)
    rows = {}
    check = None
    for kind in ("image1024", "image448", "video"):
        ids, pv, grid = inputs(kind, tiny, config)
        run = runners(ours, theirs, ids, pv, grid, kind, device, compile_ours, theirs_mode)
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
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        full[name].append(timed(lambda: g(decode_tokens, b), device)[0])
                        if device.type == "cuda":
                            peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                        first[name].append(timed(lambda: g(1, b), device)[0])
                if device.type == "cpu":       # one process holds both models: measure each in its own
                    peaks = {name: peak_rss_child(config_name, name, decode_tokens) for name in full}
                rate = {k: b * (decode_tokens - 1) / (statistics.median(full[k]) - statistics.median(first[k]))
                        for k in full}
                rows[f"decode tokens/s, batch {b} [{kind}]"] = {k: v if v > 0 else float("nan") for k, v in rate.items()}
                if b == 1:
                    rows[f"peak memory GB, batch 1 [{kind}]"] = {k: v / 1e9 for k, v in peaks.items()}
    compile_s = None
    if compile_ours:                       # compile time = first call after a reset - a warm call
        torch._dynamo.reset()
        ids, pv, grid = inputs("image448", tiny, config)
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


def report(config_name, device, dtype, rows, check, compile_s, lm_bytes, compile_ours=False, theirs_mode="default"):
    lines = [f"### {config_name} config, {str(dtype)[6:]}, {hardware(device)}",
             f"{datetime.date.today()}; torch {torch.__version__}, transformers "
             f"{__import__('transformers').__version__}, Python {platform.python_version()}; "
             f"`{' '.join(['python'] + sys.argv)}`; greedy tokens identical: {check[0]}", "",
             f"| metric | qwen2vl_min{' (compiled decode)' if compile_ours else ''} | transformers (sdpa"
             f"{', static cache + compile' if theirs_mode != 'default' else ''}) | ours / theirs |", "|---|---|---|---|"]
    for metric, v in rows.items():
        lines.append(f"| {metric} | {v['ours']:.4g} | {v['transformers']:.4g} | {v['ours'] / v['transformers']:.2f} |")
    bw = next((b for k, b in BANDWIDTH.items() if k in hardware(device)), None)
    if bw is None and device.type == "cpu" and lm_bytes > 100e6:     # smaller weights stay in the CPU's caches
        bw = cpu_matvec_bandwidth()
    if bw:                 # bytes of LLM weights read per token x tokens/s, against the bandwidth
        tps = rows["decode tokens/s, batch 1 [image448]"]
        lines.append(f"| decode roofline fraction, batch 1 ({lm_bytes / 1e6:,.0f} MB/token; {bw / 1e9:,.0f} GB/s"
                     f"{' = one large matvec' if device.type == 'cpu' else ''}) | {lm_bytes * tps['ours'] / bw:.1%} | "
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
    p.add_argument("--theirs", choices=["default", "static-compile"], default="default",
                   help="transformers' mode: its default generate, or its static cache + torch.compile")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in a.config or (["2B", "7B"] if device.type == "cuda" else ["small"]):
        rows, check, compile_s, lm_bytes = measure(name, device, dtype, a.iters, a.decode_tokens, a.compile, a.theirs)
        text = report(name, device, dtype, rows, check, compile_s, lm_bytes, a.compile, a.theirs)
        print(text)
        if not a.no_save:
            with RESULTS.open("a") as f:
                f.write("\n" + text)
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
