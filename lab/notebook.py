"""Small helpers the notebook chapters share, so that their cells stay short and the logic stays here.

Loading the chapter's model (the shipped nano model unless the "edit me" cell names another), showing
matplotlib figures as PNG cell outputs, and the arithmetic a chapter narrates step by step (smart_resize,
the video token budget, RoPE similarity, a held-out loss). Everything here calls `qwen2vl_min` and `lab`;
nothing re-implements the model.
"""
from __future__ import annotations

import io
import math
from contextlib import contextmanager
from pathlib import Path

import torch

import qwen2vl_min as q
from qwen2vl_min import video as qv
from qwen2vl_min.processor import smart_resize
from qwen2vl_min.rope import inv_freq

from .train import NANO_DIR

DPI = 80          # keeps each committed notebook well under 3 MB


# ---------------------------------------------------------------- figures as cell outputs
def png(fig) -> bytes:
    """Render a figure to PNG bytes and close it (lab.plots draws with Agg: figures never open a window)."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _register_png_formatter():
    """A Figure that is a cell's value is shown as a PNG (IPython only does this for its inline backend)."""
    try:
        from IPython import get_ipython
        from matplotlib.figure import Figure
    except ImportError:
        return
    ip = get_ipython()
    if ip is not None:
        ip.display_formatter.formatters["image/png"].for_type(Figure, png)
        ip.display_formatter.formatters["text/plain"].for_type(Figure, lambda fig, p, cycle: p.text(""))


_register_png_formatter()


# ---------------------------------------------------------------- the chapter's model
def load(model=None, device="cpu", dtype="float32"):
    """-> (model, processor): `model` (a hub id or a directory) or, when None, the shipped nano model.

    If the nano checkpoint is missing (not trained yet), a random-weight model of the same shape stands in,
    with a warning: every shape and figure is right, but the answers are gibberish."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if model is not None or (NANO_DIR / "model.safetensors").exists():
        return q.load(model or NANO_DIR, device=device, dtype=dtype)
    print(f"WARNING: {NANO_DIR} is missing, so this chapter runs on RANDOM weights of the nano's shape "
          "(answers are gibberish). `python -m lab.train` trains the real one.")
    return random_nano(device, dtype)


def random_nano(device="cpu", dtype=torch.float32, seed=0):
    """The nano architecture with freshly initialised weights (lab.train's tokenizer, config and processor)."""
    from .train import build_tokenizer, corpus, init_weights, nano_config, nano_processor
    tok = build_tokenizer(corpus(seed, n=300))
    torch.manual_seed(seed)
    model = init_weights(q.Qwen2VL(nano_config(tok)))
    return model.to(device=device, dtype=dtype).eval(), nano_processor(tok)


def describe(model) -> str:
    """One line: the sizes that matter, read from the config."""
    v, t = model.config.vision, model.config.text
    n = sum(p.numel() for p in model.parameters())
    return (f"{n / 1e6:.1f}M parameters | ViT {v.depth} x {v.embed_dim} ({v.num_heads} heads) | LLM "
            f"{t.num_hidden_layers} x {t.hidden_size} ({t.num_attention_heads} heads, {t.num_key_value_heads} kv, "
            f"head_dim {t.head_dim}) | mrope_section {list(t.mrope_section)}, rope_theta {t.rope_theta:g} | "
            f"vocab {t.vocab_size}")


def device_of(model):
    w = model.lm_head.weight
    return w.device, w.dtype


def example(name: str) -> str:
    """Path of one of the bundled example files (examples/scene.png, clip.mp4 ...)."""
    from .examples import OUT
    return str(OUT / name)


def user(*content):
    """One user turn: strings become text items, dicts (image / video items) pass through."""
    return [{"role": "user", "content": [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]}]


def resized(image, grid_thw, patch=14):
    """The picture at the size the model sees it (what smart_resize + the processor's resize made)."""
    from PIL import Image
    from qwen2vl_min.processor import load_image
    _, gh, gw = (int(x) for x in grid_thw.reshape(-1)[:3])
    return load_image(image).resize((gw * patch, gh * patch), Image.BICUBIC)


def token_view(processor, batch, config, row=0):
    """-> (token texts, token kinds, M-RoPE ids (3, L)) of one prompt: what plots.token_strip draws."""
    from .attention import token_kinds
    ids = batch.input_ids[row]
    pos, _ = q.rope.mrope_position_ids(batch.input_ids, batch.image_grid_thw, batch.video_grid_thw,
                                       batch.attention_mask, config)
    special = set(processor.eos_token_ids) | {processor.tokenizer.token_to_id("<|im_start|>")}
    labels = [processor.decode([t], skip_special_tokens=False) for t in ids.tolist()]
    return labels, token_kinds(ids, config, special), pos[:, row]


def prompt_text(processor, ids) -> str:
    """The prompt as text, each run of repeated placeholder tokens shown once with its count."""
    out, ids = [], list(ids)
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        piece = processor.decode([ids[i]], skip_special_tokens=False)
        out.append(f"{piece} x {j - i}" if j - i > 2 and piece.startswith("<|") else piece * (j - i))
        i = j
    return "".join(out)


def preset_parameters(model=None) -> dict:
    """Parameter counts of the 2B / 7B / 72B presets (built on the meta device: no memory) and of `model`."""
    counts = {}
    for name, cfg in q.PRESETS.items():
        with torch.device("meta"):
            counts[f"Qwen2-VL-{name}"] = sum(p.numel() for p in q.Qwen2VL(cfg).parameters())
    if model is not None:
        counts["this model"] = sum(p.numel() for p in model.parameters())
    return counts


# ---------------------------------------------------------------- chapter 2: smart_resize step by step
def resize_steps(height, width, factor=28, min_pixels=q.processor.MIN_PIXELS, max_pixels=q.processor.MAX_PIXELS):
    """smart_resize narrated: -> (list of text lines, (h, w)). The result is checked against smart_resize."""
    lines = [f"input {width}x{height} = {width * height:,} px; factor {factor}, "
             f"pixels allowed [{min_pixels:,}, {max_pixels:,}]"]
    h, w = round(height / factor) * factor, round(width / factor) * factor
    lines.append(f"1. round each side to a multiple of {factor}: {width}x{height} -> {w}x{h} = {w * h:,} px")
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
        lines.append(f"2. too many pixels: shrink by beta = sqrt({height * width:,} / {max_pixels:,}) = {beta:.4f}, "
                     f"floor to {factor}: {w}x{h} = {w * h:,} px")
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        lines.append(f"2. too few pixels: grow by beta = sqrt({min_pixels:,} / {height * width:,}) = {beta:.4f}, "
                     f"ceil to {factor}: {w}x{h} = {w * h:,} px")
    else:
        lines.append("2. inside the pixel range: keep it")
    gh, gw = h // 14, w // 14
    lines.append(f"3. {gh}x{gw} = {gh * gw} patches of 14 px -> 2x2 merge -> {gh // 2}x{gw // 2} = "
                 f"{gh * gw // 4} tokens (+2 for <|vision_start|>, <|vision_end|>)")
    assert (h, w) == smart_resize(height, width, factor, min_pixels, max_pixels)
    return lines, (h, w)


def image_tokens(width, height, min_pixels=q.processor.MIN_PIXELS, max_pixels=q.processor.MAX_PIXELS) -> int:
    """Merged visual tokens of a width x height image (without <|vision_start|> / <|vision_end|>)."""
    h, w = smart_resize(round(height), round(width), 28, min_pixels, max_pixels)
    return (h // 28) * (w // 28)


def tokens_by_long_side(sides, aspect, min_pixels=q.processor.MIN_PIXELS, max_pixels=q.processor.MAX_PIXELS):
    """Tokens for images whose longer side is each of `sides` px, at aspect = width / height."""
    dims = [(s, s / aspect) if aspect >= 1 else (s * aspect, s) for s in sides]
    return [image_tokens(w, h, min_pixels, max_pixels) for w, h in dims]


# REFERENCE.md section 7, measured with transformers' and qwen-vl-utils' own code: (W, H) -> tokens
REFERENCE_TOKENS = {
    "transformers class default (max 1,003,520 px)": {
        (224, 224): 64, (448, 448): 256, (1280, 720): 1196, (1000, 1000): 1225, (1920, 1080): 1222,
        (4032, 3024): 1230, (640, 480): 391, (1024, 768): 999, (100, 100): 16, (56, 56): 4},
    "hub preprocessor_config / qwen-vl-utils (max 12,845,056 px)": {
        (224, 224): 64, (448, 448): 256, (1280, 720): 1196, (1000, 1000): 1296, (1920, 1080): 2691,
        (4032, 3024): 15552, (640, 480): 391, (1024, 768): 999, (100, 100): 16, (56, 56): 4},
}
REFERENCE_MAX_PIXELS = {"transformers class default (max 1,003,520 px)": 28 * 28 * 1280,
                        "hub preprocessor_config / qwen-vl-utils (max 12,845,056 px)": 28 * 28 * 16384}


def token_table(reference=REFERENCE_TOKENS, max_pixels=REFERENCE_MAX_PIXELS):
    """Recompute REFERENCE section 7 with smart_resize -> (markdown table, {setting: {size: tokens}})."""
    rows = ["| input W x H | " + " | ".join(reference) + " |", "|---" * (len(reference) + 1) + "|"]
    measured = {name: {} for name in reference}
    for (W, H) in next(iter(reference.values())):
        cells = []
        for name, expected in reference.items():
            h, w = smart_resize(H, W, 28, q.processor.MIN_PIXELS, max_pixels[name])
            n = (h // 28) * (w // 28)
            measured[name][f"{W}x{H}"] = n
            cells.append(f"{w}x{h}, grid (1, {h // 14}, {w // 14}), **{n}** (+2 = {n + 2}) "
                         + ("✓" if n == expected[(W, H)] else f"✗ expected {expected[(W, H)]}"))
        rows.append(f"| {W}x{H} | " + " | ".join(cells) + " |")
    return "\n".join(rows), measured


# ---------------------------------------------------------------- chapter 6: the video budget
def video_plan(seconds, source_fps, width, height, fps=qv.FPS, min_pixels=qv.VIDEO_MIN_PIXELS,
               total_pixels=qv.VIDEO_TOTAL_PIXELS, max_frames=qv.FPS_MAX_FRAMES) -> dict:
    """What read_video + video_to_patches will make of a clip, without decoding one (qwen-vl-utils 0.0.8)."""
    total = max(2, round(seconds * source_fps))
    idx = qv.sample_indices(total, source_fps, fps, max_frames=max_frames)
    cap = qv.frame_pixels(len(idx), min_pixels, total_pixels)
    h, w = smart_resize(height, width, 28, min_pixels, cap)
    grid = (len(idx) // 2, h // 14, w // 14)
    return {"source_frames": total, "indices": idx, "frames": len(idx), "sample_fps": len(idx) / total * source_fps,
            "frame_cap_pixels": int(cap), "resized": (w, h), "grid_thw": grid,
            "tokens": grid[0] * grid[1] * grid[2] // 4}


def plan_summary(plan) -> str:
    w, h = plan["resized"]
    return (f"{plan['source_frames']} source frames -> {plan['frames']} sampled ({plan['sample_fps']:.2f} fps), "
            f"{w}x{h} per frame, grid {plan['grid_thw']} -> {plan['tokens']:,} tokens")


# ---------------------------------------------------------------- hooks: what a module saw and made
@contextmanager
def capture(modules: dict):
    """Record the first input and the output of named modules during a forward: {name: (input, output)}."""
    seen, handles = {}, []
    for name, module in modules.items():
        def hook(mod, args, out, name=name):
            seen.setdefault(name, (args[0].detach() if args else None, out.detach()))
        handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def shape_ledger(model, batch) -> list[tuple[str, tuple]]:
    """(stage, shape) from the pixel rows to the LLM's input embeddings, read off one real forward pass."""
    v = model.visual
    watch = {"PatchEmbed (Conv3d)": v.patch_embed, "ViT block 0": v.blocks[0],
             f"ViT block {len(v.blocks) - 1}": v.blocks[-1], "merger.ln_q": v.merger.ln_q, "merger.mlp": v.merger.mlp,
             "embed_tokens": model.model.embed_tokens}
    with torch.inference_mode(), capture(watch) as seen:
        embeds = model.embed(batch.input_ids, batch.pixel_values, batch.image_grid_thw,
                             batch.pixel_values_videos, batch.video_grid_thw)
    shape = lambda name, i=1: tuple(seen[name][i].shape)
    return [("pixel_values", tuple(batch.pixel_values.shape))] + [(n, shape(n)) for n in list(watch)[:4]] + [
        ("merger: 4 rows viewed as 1", shape("merger.mlp", 0)), ("merger.mlp = visual features", shape("merger.mlp")),
        ("embed_tokens(input_ids)", shape("embed_tokens")), ("spliced input embeddings", tuple(embeds.shape))]


# ---------------------------------------------------------------- chapter 4: attention blocks of the ViT
def vision_blocks(grids, kinds):
    """[(label, patches)] for every attention block: one per image, one per temporal patch of a video."""
    out, count = [], {}
    for (t, h, w), kind in zip(grids.tolist(), kinds):
        count[kind] = count.get(kind, 0) + 1
        for k in range(t):
            out.append((f"{kind} {count[kind]} #" + (f"t{k}" if t > 1 else ""), h * w))
    return out


def dense_block_mask(grids) -> torch.Tensor:
    """The N x N boolean mask of those blocks. Only to check block_attention: the model never builds it."""
    sizes = (grids[:, 1] * grids[:, 2]).repeat_interleave(grids[:, 0])
    block = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    return block[:, None] == block[None, :]


# ---------------------------------------------------------------- chapter 5: what rotation does to similarity
def rope_similarity(grid_hw, query_hw, head_dim, theta, mrope_section, bands="hw"):
    """Cosine between a query and a key that hold the same vector (all ones) at different M-RoPE positions of an
    image's merged grid, over the rotary pairs of `bands`: what position alone does to the attention score.
    For that vector it is the mean over the pairs of cos(position difference x frequency); computed in float64,
    because the slow bands move it by less than float32 resolves. (The t band adds nothing inside one image:
    all its tokens share one t.) -> (h, w)."""
    h, w = grid_hw
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)   # = rope.inv_freq
    edges = [0, *torch.tensor(mrope_section).cumsum(0).tolist()]
    dh = (torch.arange(h, dtype=torch.float64) - query_hw[0]).view(h, 1, 1)
    dw = (torch.arange(w, dtype=torch.float64) - query_hw[1]).view(1, w, 1)
    parts = {"t": torch.zeros(1, 1, 1, dtype=torch.float64), "h": dh, "w": dw}
    cos = [torch.cos(parts[name] * freqs[edges[b]:edges[b + 1]]).expand(h, w, -1)
           for b, name in enumerate("thw") if name in bands]
    return torch.cat(cos, -1).mean(-1)


def wavelengths(head_dim, theta):
    """Tokens per full turn of each rotary pair: 2 pi / inv_freq, (head_dim/2,)."""
    return 2 * math.pi / inv_freq(head_dim, theta)


def long_video_rules(config, grid_thw=(30, 12, 20), prefix=4, text_after=2):
    """Where the text after a long video starts, by the paper's rule (computed with mrope_position_ids) and
    by transformers >= 5.3 (start + max(h, w) / 2, REFERENCE 5.2). -> {rule: {row label: (first, last)}}."""
    t, h, w = grid_thw
    m = config.vision.spatial_merge_size
    n = t * (h // m) * (w // m)
    ids = torch.tensor([[0] * (prefix - 1) + [config.vision_start_token_id] + [config.video_token_id] * n
                        + [config.vision_end_token_id] + [0] * text_after])
    pos, _ = q.rope.mrope_position_ids(ids, None, torch.tensor([grid_thw]), None, config)
    video = pos[:, 0, prefix:prefix + n]
    after = pos[0, 0, prefix + n:]
    rows = {f"video {name} ids": (int(video[i].min()), int(video[i].max())) for i, name in enumerate("thw")}
    v5_start = prefix + max(h, w) // m
    return {"paper / transformers 4.x / vLLM (this lab)": {**rows, "text after (paper)": (int(after[0]),
                                                                                          int(after[-1]))},
            "transformers >= 5.3": {"text after (v5.3+)": (v5_start, v5_start + text_after)}}


# ---------------------------------------------------------------- chapter 7: the decoder and generation
@torch.no_grad()
def residual_rms(model, batch, kinds) -> dict:
    """RMS of the residual stream (embeddings, then after each decoder layer), averaged per token kind."""
    layers = model.model.layers
    with capture({i: layer for i, layer in enumerate(layers)} | {"embed": model.model.embed_tokens}) as seen:
        model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
              batch.pixel_values_videos, batch.video_grid_thw)
    # the first input of layer 0 is the spliced embedding; then each layer's output
    states = [seen[0][0]] + [seen[i][1] for i in range(len(layers))]                 # (layers+1) x (1, L, C)
    rms = torch.stack([s[0].float().pow(2).mean(-1).sqrt() for s in states])         # (layers+1, L)
    return {k: rms[:, [i for i, kk in enumerate(kinds) if kk == k]].mean(1).tolist() for k in dict.fromkeys(kinds)}


@torch.no_grad()
def cached_vs_full(model, batch, n=8):
    """Greedy decoding through the KV cache, checked against one full forward over prompt + answer.
    -> (token ids, max |logit difference| per step, seconds per step (prefill first))."""
    import time
    L = batch.input_ids.shape[1]
    cache = q.KVCache(model.config.text, 1, L + n, *device_of(model))
    mask = torch.ones(1, L + n, dtype=torch.long, device=batch.input_ids.device)
    t0 = time.perf_counter()
    logits, deltas = q.prefill(model, batch, cache)
    steps, tokens, times = [logits], [], [time.perf_counter() - t0]
    for k in range(n - 1):
        tokens.append(logits.argmax(-1))                                                # (1,) greedy
        t0 = time.perf_counter()
        logits = q.decode_step(model, tokens[-1][:, None], mask[:, :L + k + 1], cache, L + k, deltas)
        steps.append(logits)
        times.append(time.perf_counter() - t0)
    tokens.append(logits.argmax(-1))
    ids = torch.cat([batch.input_ids, torch.stack(tokens[:-1], 1)], 1)               # prompt + answer but the last
    full = model(ids, torch.ones_like(ids), batch.pixel_values, batch.image_grid_thw, batch.pixel_values_videos,
                 batch.video_grid_thw)[0, L - 1:]                                       # (n, V)
    diffs = (torch.stack(steps, 1)[0] - full).abs().amax(-1)
    return [int(t) for t in tokens], diffs.tolist(), times


def top_tokens(processor, logits, temperatures=(0.5, 1.0, 2.0), k=8):
    """-> (the k most likely next tokens' texts, {"T = t": their probabilities at each temperature})."""
    top = logits.float().softmax(-1).topk(k).indices
    labels = [processor.decode([int(i)], skip_special_tokens=False) for i in top]
    return labels, {f"T = {t:g}": (logits.float() / t).softmax(-1)[top].tolist() for t in temperatures}


def answer_positions(model, batch, n_new):
    """M-RoPE ids of the prompt (3, L) followed by those generate gives n_new answer tokens: index + rope_delta."""
    pos, deltas = q.rope.mrope_position_ids(batch.input_ids, batch.image_grid_thw, batch.video_grid_thw,
                                            batch.attention_mask, model.config)
    L = batch.input_ids.shape[1]
    new = (torch.arange(L, L + n_new) + deltas[0].cpu()).expand(3, -1)
    return torch.cat([pos[:, 0].cpu(), new], 1), int(deltas[0])


# ---------------------------------------------------------------- chapter 8: attention maps
def layer_head_maps(probs, span, max_layers=4):
    """One generated token's attention (layers, H, S) -> maps of up to max_layers evenly spaced layers x every head
    over the span's first grid: ((n, h, w), labels, heads per row)."""
    n_layers, heads = probs.shape[:2]
    layers = sorted({round(x) for x in torch.linspace(0, n_layers - 1, min(max_layers, n_layers)).tolist()})
    T, h, w = span.grid
    maps = probs[layers][:, :, span.start:span.start + h * w].reshape(-1, h, w).cpu()
    return maps, [f"L{layer} H{k}" for layer in layers for k in range(heads)], heads


def favourite_tokens(record, prompt_len):
    """Per layer and head, the prompt token that gets the most attention on average over all recorded tokens, and
    that share: a head that keeps returning to one token whatever is generated acts as a sink.
    -> (share (layers, H), token index (layers, H))."""
    mean = torch.stack([record.probs(i)[:, :, :prompt_len] for i in range(len(record))]).mean(0)   # (layers, H, L)
    return mean.max(-1).values.cpu(), mean.max(-1).indices.cpu()


# ---------------------------------------------------------------- chapter 9: what a stage changes
def held_out(n=6, seed=1234, categories=("caption", "color", "shape", "count", "position", "number",
                                         "video_direction", "two_image")):
    """A fixed held-out set: n examples per category, with the evaluation's exact phrasings."""
    import random

    from . import synthetic
    return {c: [synthetic.make_example(random.Random(f"{seed}-{c}-{i}"), c, exact=1.0) for i in range(n)]
            for c in categories}


@torch.no_grad()
def answer_loss(model, processor, sets) -> dict:
    """Mean cross-entropy of the right answers (assistant tokens only) per category: lower = closer."""
    from .train import make_batch, next_token_loss
    device, dtype = device_of(model)
    out = {}
    for cat, examples in sets.items():
        batch, labels = make_batch(processor, examples, "assistant")
        out[cat] = next_token_loss(model, model.config, batch.to(device, dtype), labels.to(device)).item()
    return out


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_change(before: dict, model) -> dict:
    """How far each top-level part moved: ||after - before|| / ||before||, for the ViT and the LLM."""
    out = {}
    for part in ("visual", "model"):
        keys = [k for k in before if k.startswith(part + ".")]
        diff = sum(float((model.state_dict()[k] - before[k]).float().norm() ** 2) for k in keys) ** 0.5
        base = sum(float(before[k].float().norm() ** 2) for k in keys) ** 0.5
        out[part] = diff / base
    return out


# ---------------------------------------------------------------- chapter 10: where the parameters are
def parameter_groups(model) -> dict:
    """Parameter counts by component (a tied lm_head is counted once, with the embeddings)."""
    groups, seen = {}, set()
    names = [("visual.patch_embed", "ViT patch embed"), ("visual.blocks", "ViT blocks"), ("visual.merger", "merger"),
             ("model.embed_tokens", "embed_tokens"), ("model.layers", "decoder layers"), ("model.norm", "final norm"),
             ("lm_head", "lm_head")]
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        label = next(label for prefix, label in names if name.startswith(prefix))
        groups[label] = groups.get(label, 0) + p.numel()
    return groups


def checkpoint_dir(model_name, model=None, processor=None) -> Path:
    """The chapter's checkpoint directory; the stand-in random model is saved to a temporary one."""
    if model_name is not None or (NANO_DIR / "model.safetensors").exists():
        return q.weights.resolve(model_name or NANO_DIR)
    import tempfile
    return q.save(model, processor, Path(tempfile.mkdtemp()) / "random-nano")


def checkpoint_shapes(path) -> dict:
    """{tensor name: shape} over every safetensors file of a checkpoint, read from the headers only."""
    from safetensors import safe_open
    shapes = {}
    for file in q.weights._tensor_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def collapse_layers(shapes: dict) -> dict:
    """Fold numbered layers: 'model.layers.{i}.mlp.up_proj.weight' -> (shape, how many layers)."""
    import re
    out = {}
    for k, shape in shapes.items():
        key = re.sub(r"\.(\d+)\.", ".{i}.", k, count=1)
        out[key] = (shape, out.get(key, (shape, 0))[1] + 1)
    return out


def module_tree_name(key: str) -> str:
    """A hub-layout key renamed to transformers >= 4.52's module tree (the inverse of weights.KEY_PREFIXES)."""
    for tree, hub in q.weights.KEY_PREFIXES:
        if key.startswith(hub):
            return tree + key[len(hub):]
    return key


def write_module_tree_copy(path, out) -> Path:
    """Copy a hub-layout checkpoint with every tensor renamed to the module-tree layout (what 4.52-4.57 saved)."""
    import shutil

    from safetensors.torch import load_file, save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(path).iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    tensors = {}
    for file in q.weights._tensor_files(Path(path)):
        tensors.update({module_tree_name(k): v for k, v in load_file(str(file)).items()})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def layout_mapping(keys, depth=2) -> dict:
    """{"hub prefix.* -> module-tree prefix.*": number of tensors}, by the first `depth` dotted parts of each key."""
    out = {}
    for k in keys:
        hub = ".".join(k.split(".")[:depth])
        label = f"{hub}.*  ->  {module_tree_name(hub + '.')}*"
        out[label] = out.get(label, 0) + 1
    return out


def hf_inputs(batch, config) -> dict:
    """A Batch as transformers' keyword arguments; v5 needs mm_token_type_ids (1 image, 2 video) with pixels."""
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if batch.pixel_values is not None:
        kw.update(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
    if batch.pixel_values_videos is not None:
        kw.update(pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw)
    if batch.pixel_values is not None or batch.pixel_values_videos is not None:
        kw["mm_token_type_ids"] = ((batch.input_ids == config.image_token_id).long()
                                   + 2 * (batch.input_ids == config.video_token_id).long())
    return kw


def read_json(path):
    import json
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
