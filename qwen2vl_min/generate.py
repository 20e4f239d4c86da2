"""Stage 5 — generation: prefill the prompt once, then decode one token at a time from the KV cache.

`generate` is a Python generator that yields token ids as they are chosen, so a notebook, the app and the
benchmark share one loop. M-RoPE makes the decode positions differ from the cache index: the prompt's
visual tokens use fewer positions than tokens, so position = cache index + rope_delta (REFERENCE 5.2),
with rope_deltas held here in the loop, not on the model.
Dimension legend: B batch, L prompt length, V vocab.
"""
import torch

from .language import KVCache
from .rope import mrope_cos_sin, mrope_position_ids


def prefill(model, batch, cache: KVCache, position_ids=None):
    """Run the whole prompt, filling the cache. -> last-position logits (B, V), rope_deltas (B, 1).

    position_ids (3, B, L) replace the M-RoPE ids when given (the lab's 1D-position ablation uses this).
    """
    if position_ids is None:
        position_ids, rope_deltas = mrope_position_ids(batch.input_ids, batch.image_grid_thw,
                                                       batch.video_grid_thw, batch.attention_mask, model.config)
    else:                                       # the next token continues after the largest id of its row
        rope_deltas = position_ids.amax(dim=(0, 2))[:, None] + 1 - batch.input_ids.shape[1]
    logits = model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                   batch.pixel_values_videos, batch.video_grid_thw, position_ids=position_ids,
                   cache=cache, cache_pos=0, last_only=True)                # (B, 1, V)
    return logits[:, -1], rope_deltas


def decode_step(model, tokens, attention_mask, cache: KVCache, cache_pos, rope_deltas, rope_table=None):
    """One new token per row: tokens (B, 1) written at cache index cache_pos -> logits (B, V).

    cache_pos is a 0-dim device tensor and attention_mask (B, max_len) spans the whole cache, so every step
    has the same shapes: one compiled graph (CUDA graph) serves them all, with no host synchronisation.
    rope_table (decode_rope_table), when given, replaces computing the rotary angles in every step.
    """
    rope = rope_table and tuple(t[:, cache_pos][:, None] for t in rope_table)     # (B, max_len, D) -> (B, 1, D)
    positions = None if rope else (cache_pos + rope_deltas).view(1, -1, 1).expand(3, -1, 1)  # t = h = w rows
    return model(tokens, attention_mask, position_ids=positions, rope=rope, cache=cache, cache_pos=cache_pos)[:, -1]


def decode_rope_table(model, rope_deltas, max_len: int, dtype):
    """cos, sin (B, max_len, D) of a token decoded at each cache index: text, t = h = w = index + rope_delta."""
    t, pos = model.config.text, torch.arange(max_len, device=rope_deltas.device) + rope_deltas  # (B, max_len)
    return mrope_cos_sin(pos[None].expand(3, -1, -1), t.head_dim, t.rope_theta, t.mrope_section, dtype)


_compiled = {}


def compiled_decode_step(cache: KVCache):
    """decode_step under torch.compile(mode="reduce-overhead"): CUDA graphs replay the whole step."""
    for t in (cache.k, cache.v):              # the cache is mutated in place: keep its address fixed
        torch._dynamo.mark_static_address(t)
    if "step" not in _compiled:
        _compiled["step"] = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    return _compiled["step"]


def sample(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None):
    """logits (B, V) -> token ids (B,). Greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:                                    # keep the k most likely tokens
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:                                  # keep the smallest set whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # a token is dropped if the ones before it suffice
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(model, batch, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, stop_token_ids=None,
             seed=None, position_ids=None, compile=False):
    """Yield the next token id: an int for one conversation, a list of ints for a batch.

    Stops at the stop tokens (default: the batch's <|im_end|> / <|endoftext|>) or after max_new_tokens.
    In a batch, a row that has stopped repeats its stop token until every row has stopped.
    compile=True runs the decode step compiled (CUDA graphs); the cache length is then rounded up to a
    multiple of 256 so that prompts of similar length reuse one compiled graph.
    """
    cfg = model.config.text
    B, L = batch.input_ids.shape
    if L > cfg.max_position_embeddings:
        raise ValueError(f"the prompt has {L} tokens but the model's context is {cfg.max_position_embeddings}; "
                         "use fewer or smaller images/videos (lower max_pixels) or a shorter text")
    max_new_tokens = min(max_new_tokens, cfg.max_position_embeddings - L)
    stop = set(stop_token_ids if stop_token_ids is not None else batch.stop_token_ids)
    device, dtype = batch.input_ids.device, next(model.parameters()).dtype
    max_len = L + max_new_tokens if not compile else -(-(L + max_new_tokens) // 256) * 256
    cache = KVCache(cfg, B, max_len, device, dtype)
    step_fn = compiled_decode_step(cache) if compile else decode_step
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    attention_mask = torch.ones(B, max_len, dtype=torch.long, device=device)   # future slots: masked causally
    attention_mask[:, :L] = batch.attention_mask
    logits, rope_deltas = prefill(model, batch, cache, position_ids)
    rope_table = None if compile else decode_rope_table(model, rope_deltas, max_len, dtype)  # compiled: in-graph
    done, ids = [False] * B, []                    # a finished row repeats its last token until all have finished
    for step in range(max_new_tokens):
        if step:
            cache_pos = torch.tensor(L + step - 1, device=device) if compile else L + step - 1
            logits = step_fn(model, last, attention_mask, cache, cache_pos, rope_deltas, rope_table)
        new = sample(logits, temperature, top_p, top_k, generator).tolist()  # (B,) -> B ints: the step's one sync
        ids = [old if finished else t for t, old, finished in zip(new, ids or new, done)]
        yield ids[0] if B == 1 else ids
        done = [finished or t in stop for t, finished in zip(ids, done)]
        if all(done):
            return
        last = torch.tensor(ids, device=device)[:, None]                          # (B, 1)


def stream_text(processor, tokens):
    """Token ids (one conversation) -> text pieces, holding back bytes of a half-finished UTF-8 character."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = processor.decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
