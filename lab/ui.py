"""The lab app: chat with a Qwen2-VL about images and videos (left) while inspecting what it saw (right).

`build_demo(model, processor)` returns the Gradio Blocks; `app.py` launches it. The event handlers are the
plain functions and methods below, tested directly. The model runs one request at a time (Gradio's queue);
each browser session keeps its own history and inspections in a gr.State, so no session sees another's.
The attention maps come from `lab.trace.record_attention` around the very `generate` call that wrote the
answer: inspecting never reruns the model and never changes what it said.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

import qwen2vl_min as q
from qwen2vl_min.rope import mrope_position_ids

from . import plots
from .attention import KINDS, grid_map, modality_share, reduce, token_kinds, visual_spans
from .trace import record_attention

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXT = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
ERROR = "⚠️ "                 # answers that start with this are messages from the app, never sent to the model
KEEP = 8                      # inspections kept per session (each holds the answer's queries and keys)
MEAN = "mean"


class InputError(ValueError):
    """A problem with what the user sent: shown in the chat, the app keeps serving."""


# ---------------------------------------------------------------- messages: Gradio -> qwen2vl_min
def _path(block):
    """The file path inside any shape Gradio hands over (str, {"path"}, {"file": {...}}, FileData, tuple)."""
    if isinstance(block, (str, Path)):
        return str(block)
    if isinstance(block, (tuple, list)) and block:
        return _path(block[0])
    if isinstance(block, dict):
        return block.get("path") or _path(block.get("file") or block.get("value") or {})
    return getattr(block, "path", None)


def file_item(path) -> dict:
    """An uploaded file -> a processor content item; a clear InputError for anything else."""
    p = Path(str(path))
    if not p.is_file():
        raise InputError(f"{p.name}: the upload is gone; attach the file again")
    if p.stat().st_size == 0:
        raise InputError(f"{p.name} is empty (0 bytes); attach a real image or video")
    if p.suffix.lower() in VIDEO_EXT:
        return {"type": "video", "video": str(p)}
    if p.suffix.lower() in IMAGE_EXT:
        return {"type": "image", "image": str(p)}
    raise InputError(f"{p.name} is neither an image nor a video; attach one of "
                     f"{', '.join(sorted(IMAGE_EXT | VIDEO_EXT))}")


def _content(content) -> list[dict]:
    """One message's content in any of Gradio's shapes -> processor content items (text and files)."""
    if content is None:
        return []
    blocks = content if isinstance(content, list) else [content]
    if isinstance(content, tuple):                                   # ("path",) or ("path", "alt text")
        blocks = [content]
    items = []
    for block in blocks:
        if isinstance(block, str):
            items.append({"type": "text", "text": block})
        elif isinstance(block, dict) and block.get("type") == "text":
            items.append({"type": "text", "text": block.get("text", "")})
        elif _path(block):
            items.append(file_item(_path(block)))
    return items


def normalise_history(history) -> list[dict]:
    """Gradio's history (browser content blocks, or the client's paths and strings) -> processor messages.
    Consecutive user messages (Gradio splits files from text) become one; turns whose answer was an app
    message (an error) are dropped, so a bad upload is not sent to the model again."""
    kept = []
    for m in history or []:                    # first drop the failed turns, then read the files of the rest
        if _role(m) == "assistant" and _text(m).startswith(ERROR):
            while kept and _role(kept[-1]) == "user":
                kept.pop()
        else:
            kept.append(m)
    messages = []
    for m in kept:
        items = _content(m["content"] if isinstance(m, dict) else m.content)
        if _role(m) == "assistant":
            messages.append({"role": "assistant", "content": " ".join(i["text"] for i in items if i["type"] == "text")})
        elif messages and messages[-1]["role"] == "user":
            messages[-1]["content"] += items
        else:
            messages.append({"role": "user", "content": items})
    return messages


def user_turn(message) -> dict:
    """The new message ({"text", "files"} or a string) -> one user turn."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    text = (message.get("text") or "").strip()
    items = [file_item(_path(f)) for f in message.get("files") or []]
    if not text and not items:
        raise InputError("empty message: type a question, or attach an image or a video")
    return {"role": "user", "content": items + ([{"type": "text", "text": text}] if text else [])}


# ---------------------------------------------------------------- one answer and what it saw
@dataclass
class Inspection:
    """Everything the inspector shows about one answer; rendering reads it, nothing reruns the model."""
    prompt_ids: torch.Tensor          # (L,)
    position_ids: np.ndarray          # (3, L) M-RoPE ids of the prompt
    kinds: list                       # one of KINDS per prompt token
    labels: list                      # token texts of the prompt
    spans: list                       # lab.attention.Span per image / video
    media: list                       # processor display info per image / video
    answer_ids: list = field(default_factory=list)
    record: object = None             # lab.trace.AttentionRecord of the generation

    def answer_labels(self, processor) -> list[str]:
        return [processor.decode([t], skip_special_tokens=False) for t in self.answer_ids]


def budget_lines(media) -> str:
    """Per upload: original size -> resized size, grid_thw, visual tokens, frames sampled."""
    lines = []
    for i, info in enumerate(media):
        w, h = info["resized_size"]
        if info["kind"] == "image":
            ow, oh = info["original_size"]
            lines.append(f"- image {i + 1}: {ow}x{oh} → {w}x{h} px, grid_thw {info['grid_thw']}, "
                         f"**{info['tokens']} visual tokens**")
        else:
            lines.append(f"- video {i + 1}: {info['frames']} frames sampled at {info['fps']:.2f} fps → {w}x{h} px, "
                         f"grid_thw {info['grid_thw']}, **{info['tokens']} visual tokens**")
    return "\n".join(lines) or "- no images or videos in this conversation"


def media_frames(info) -> list:
    """The pictures an image / video was turned into, at the resized size, one per temporal patch."""
    w, h = info["resized_size"]
    if info["kind"] == "image":
        return [info["image"].resize((w, h), Image.BICUBIC)]
    return [f for f in info["pixels"][::2]]                            # (3, h, w) per temporal patch


class Lab:
    """The app's state-free logic: the model and processor, and what each event does."""

    def __init__(self, model, processor, max_new_tokens=128, video_tokens=None):
        self.model, self.processor = model, processor
        self.max_new_tokens = max_new_tokens
        ctx = model.config.text.max_position_embeddings
        self.video_tokens = video_tokens or ctx // 2              # a video is sampled to fit this many tokens
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype

    def _video_options(self, item):
        per_patch = self.processor.video_pixels.get("max_pixels")
        if item["type"] == "video" and per_patch:              # frames capped so the video fits its budget
            item["max_frames"] = max(4, 2 * (self.video_tokens // max(1, per_patch // (28 * 28))))
        return item

    def prepare(self, messages):
        """messages -> (Batch on the model's device, Inspection of its prompt)."""
        for m in messages:
            if m["role"] == "user":
                m["content"] = [self._video_options(dict(i)) for i in m["content"]]
        try:
            batch = self.processor(messages, add_generation_prompt=True)
        except ValueError as e:
            raise InputError(str(e)) from None
        L, ctx = batch.input_ids.shape[1], self.model.config.text.max_position_embeddings
        if L + 1 > ctx:
            raise InputError(f"the conversation needs {L} tokens but the model reads at most {ctx}; clear the chat, "
                             "send fewer or smaller images / shorter videos, or lower max_pixels")
        ids = batch.input_ids[0]
        pos, _ = mrope_position_ids(batch.input_ids, batch.image_grid_thw, batch.video_grid_thw,
                                    batch.attention_mask, self.model.config)
        special = set(self.processor.eos_token_ids) | {self.processor.tokenizer.token_to_id("<|im_start|>")}
        insp = Inspection(ids, pos[:, 0].numpy(), token_kinds(ids, self.model.config, special),
                          [self.processor.decode([t], skip_special_tokens=False) for t in ids.tolist()],
                          visual_spans(ids, batch.image_grid_thw, batch.video_grid_thw, self.model.config),
                          batch.media)
        return batch.to(self.device, self.dtype), insp

    def respond(self, message, history, max_new_tokens=None, temperature=0.0, top_p=1.0, session=None):
        """The chat handler: streams the answer; the last yield also carries the session's new inspection."""
        session = {"inspections": list((session or {}).get("inspections") or []), "current": -1}
        try:
            turn = user_turn(message)
            if any(i["type"] == "video" for i in turn["content"]):
                yield "⏳ decoding the video…", gr.skip()
            batch, insp = self.prepare(normalise_history(history) + [turn])
        except (InputError, ValueError, OSError) as e:
            yield f"{ERROR}{e}", gr.skip()
            return
        n = int(min(max_new_tokens or self.max_new_tokens, self.max_new_tokens * 4))
        text = ""
        with record_attention(self.model, max_tokens=n) as rec:
            tokens = q.generate(self.model, batch, n, temperature=float(temperature), top_p=float(top_p))
            for piece in q.stream_text(self.processor, _keep(tokens, insp.answer_ids)):
                text += piece
                yield text, gr.skip()
        insp.record = rec.compact()
        session["inspections"] = (session["inspections"] + [insp])[-KEEP:]
        session["current"] = len(session["inspections"]) - 1
        yield text or "(no answer)", session


def _keep(tokens, into: list):
    for t in tokens:
        into.append(t)
        yield t


# ---------------------------------------------------------------- the inspector: session -> figures
def _current(session, index=None):
    found = (session or {}).get("inspections") or []
    if not found:
        return None
    return found[(session.get("current", -1) if index is None else index)]


def answer_kinds(insp, processor) -> list[str]:
    """KINDS for the prompt and then the answer's tokens: what every recorded query could see."""
    stop = set(processor.eos_token_ids)
    return insp.kinds + ["special" if t in stop else "text" for t in insp.answer_ids]


def render_tokens(insp):
    """-> (token strip figure, budget markdown)."""
    if insp is None:
        return None, "Ask something to see the prompt's tokens and positions."
    used = int(insp.position_ids.max()) + 1
    md = (f"**{len(insp.prompt_ids)} prompt tokens**, M-RoPE position ids 0…{used - 1} "
          f"(plain 1D RoPE would use 0…{len(insp.prompt_ids) - 1}).\n\n" + budget_lines(insp.media))
    return plots.token_strip(insp.labels, insp.kinds, insp.position_ids), md


def render_media(insp, media: int = 0):
    """-> (position-id maps, patch grid) of the selected image / video."""
    if insp is None or not insp.spans:
        return None, None
    media = min(int(media or 0), len(insp.spans) - 1)
    span, info = insp.spans[media], insp.media[media]
    name = f"{span.kind} {span.index + 1}"
    return (plots.position_maps(insp.position_ids, span, title=f"{name}: M-RoPE ids on its merged grid"),
            plots.patch_grid(media_frames(info)[0], title=f"{name} as the ViT sees it"))


def _pick(value):
    return None if value in (None, MEAN, "") else int(value)


def render_attention(insp, processor, token=0, layer=MEAN, head=MEAN, media=0):
    """-> overlay of one generated token's attention on the selected image / video (None without media)."""
    if insp is None or insp.record is None or not len(insp.record) or not insp.spans:
        return None
    token = min(int(token or 0), len(insp.record) - 1)
    media = min(int(media or 0), len(insp.spans) - 1)
    probs = insp.record.probs(token)                                     # (layers, H, S)
    weights = reduce(probs, _pick(layer), _pick(head))                   # (S,)
    span = insp.spans[media]
    label = insp.answer_labels(processor)[token] if token < len(insp.answer_ids) else "?"
    share = modality_share(probs, answer_kinds(insp, processor))
    title = (f"token {token} {label!r}, layer {layer}, head {head}: {float(weights[span.start:span.end].sum()):.0%} "
             f"on this {span.kind}\n(mean of all layers and heads: image {share['image']:.0%}, "
             f"video {share['video']:.0%}, text {share['text']:.0%})")
    return plots.attention_overlay(media_frames(insp.media[media]), grid_map(weights, span).numpy(), title)


def render_shares(insp, processor):
    if insp is None or insp.record is None or not len(insp.record):
        return None
    kinds = answer_kinds(insp, processor)
    shares = [[modality_share(insp.record.probs(n), kinds)[k] for k in KINDS] for n in range(len(insp.record))]
    return plots.modality_shares(shares, insp.answer_labels(processor)[:len(shares)])


def selectors(session, processor):
    """Choices of the answer, token, layer, head and media selectors for the session's current answer."""
    insp = _current(session)
    answers = [(f"answer {i + 1}: " + processor.decode(x.answer_ids)[:40], i)
               for i, x in enumerate((session or {}).get("inspections") or [])]
    if insp is None:
        return answers, None, [], [], [MEAN], [MEAN]
    labels = insp.answer_labels(processor)[:len(insp.record) if insp.record else 0]
    cfg = insp.record.queries if insp.record else []
    heads = insp.record.queries[0][0].shape[1] if insp.record and len(insp.record) else 0
    return (answers, session.get("current", len(answers) - 1), [(f"{i}: {t!r}", i) for i, t in enumerate(labels)],
            [(f"{s.kind} {s.index + 1} ({s.grid[0]}x{s.grid[1]}x{s.grid[2]})", i) for i, s in enumerate(insp.spans)],
            [MEAN] + [str(i) for i in range(len(cfg))], [MEAN] + [str(i) for i in range(heads)])


def answer_index(chat_messages, message_index, session) -> int | None:
    """The inspection of the assistant message at `message_index` of the chatbot (None if it has none)."""
    ok = [i for i, m in enumerate(chat_messages or []) if _role(m) == "assistant"
          and not str(_text(m)).startswith(ERROR)]
    if message_index not in ok:
        return None
    kept = len((session or {}).get("inspections") or [])
    k = ok.index(message_index) - (len(ok) - kept)
    return k if 0 <= k < kept else None


def _role(m):
    return m["role"] if isinstance(m, dict) else m.role


def _text(m):
    c = m["content"] if isinstance(m, dict) else m.content
    items = c if isinstance(c, list) else [c]
    return " ".join(i if isinstance(i, str) else i.get("text", "") for i in items if isinstance(i, (str, dict)))


# ---------------------------------------------------------------- the page
def examples() -> list[dict]:
    """The bundled examples (lab/examples.py, pictures of the nano's world in examples/): they work offline."""
    from .examples import EXAMPLES, OUT
    found = [{"text": text, "files": [str(OUT / f) for f in names]} for text, names, _ in EXAMPLES]
    return [e for e in found if all(Path(f).is_file() for f in e["files"])]


def build_demo(model, processor, max_new_tokens=128, title="Qwen2-VL Lab") -> gr.Blocks:
    lab = Lab(model, processor, max_new_tokens)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown(f"## {title}\nChat about images and videos on the left; see the tokens, M-RoPE positions, "
                    "patches and attention of each answer on the right.")
        with gr.Row():
            with gr.Column(scale=5):
                chatbot = gr.Chatbot(height=480, label="chat", elem_id="chat")
                box = gr.MultimodalTextbox(file_count="multiple", elem_id="ask",
                                           placeholder="Ask about an image or a video (attach several with 📎)")
                n_new = gr.Slider(1, max_new_tokens * 4, max_new_tokens, step=1, label="max new tokens", render=False)
                temp = gr.Slider(0.0, 2.0, 0.0, step=0.05, label="temperature (0 = greedy)", render=False)
                top_p = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="top-p", render=False)
                gr.ChatInterface(lab.respond, multimodal=True, chatbot=chatbot, textbox=box,
                                 additional_inputs=[n_new, temp, top_p, session],
                                 additional_inputs_accordion=gr.Accordion("Generation settings", open=False,
                                                                          render=False),
                                 additional_outputs=[session], api_name="chat", concurrency_limit=1,
                                 save_history=False, fill_height=False)
                if examples():
                    gr.Examples([[e] for e in examples()], inputs=[box], label="Examples from the nano's world "
                                "(click one, then send)")
            with gr.Column(scale=5):
                answer = gr.Dropdown(label="inspect answer", choices=[], interactive=True, elem_id="answer")
                with gr.Tab("Tokens and positions"):
                    budget = gr.Markdown("Ask something to see the prompt's tokens and positions.", elem_id="budget")
                    strip = gr.Plot(label="prompt tokens: modality and (t, h, w) ids", show_label=False)
                    media = gr.Dropdown(label="image / video", choices=[], interactive=True)
                    posmap = gr.Plot(label="M-RoPE ids on the merged grid", show_label=False)
                with gr.Tab("Patches"):
                    patches = gr.Plot(label="14 px patches and 2x2 merge groups", show_label=False)
                with gr.Tab("Attention"):
                    tokens = gr.HighlightedText(label="generated tokens (click one)", elem_id="tokens",
                                                combine_adjacent=False, show_legend=False, interactive=False)
                    with gr.Row():
                        token = gr.Dropdown(label="token", choices=[], interactive=True, elem_id="token")
                        layer = gr.Dropdown(label="layer", choices=[MEAN], value=MEAN, interactive=True)
                        head = gr.Dropdown(label="head", choices=[MEAN], value=MEAN, interactive=True)
                    overlay = gr.Plot(label="attention over the image", elem_id="overlay", show_label=False)
                    shares = gr.Plot(label="share of attention per generated token", show_label=False)

        def show(session):
            answers, current, toks, medias, layers, heads = selectors(session, processor)
            insp = _current(session)
            fig, md = render_tokens(insp)
            pos, grid = render_media(insp, 0)
            labels = insp.answer_labels(processor)[:len(toks)] if insp else []
            return (gr.update(choices=answers, value=current), md, fig,
                    gr.update(choices=medias, value=0 if medias else None), pos, grid,
                    gr.update(value=[(t, str(i)) for i, t in enumerate(labels)],
                              color_map={str(i): "#56B4E9" for i in range(len(labels))}),
                    gr.update(choices=toks, value=0 if toks else None),
                    gr.update(choices=layers, value=MEAN), gr.update(choices=heads, value=MEAN),
                    render_attention(insp, processor), render_shares(insp, processor))

        panels = [answer, budget, strip, media, posmap, patches, tokens, token, layer, head, overlay, shares]
        hidden = dict(api_visibility="private")
        session.change(show, session, panels, **hidden)

        def pick_answer(session, index):
            if index is None or not session:
                return gr.skip()
            return dict(session, current=int(index))

        answer.input(pick_answer, [session, answer], session, **hidden)

        def pick_message(session, messages, evt: gr.SelectData):
            k = answer_index(messages, evt.index if isinstance(evt.index, int) else evt.index[0], session)
            return gr.skip() if k is None else dict(session, current=k)

        chatbot.select(pick_message, [session, chatbot], session, **hidden)
        chatbot.clear(lambda: None, None, session, **hidden)           # a cleared chat forgets its maps too

        def attention(session, tok, lay, hd, med):
            return render_attention(_current(session), processor, tok, lay, hd, med)

        for control in (token, layer, head, media):
            control.input(attention, [session, token, layer, head, media], overlay, **hidden)
        media.input(lambda s, m: render_media(_current(s), m), [session, media], [posmap, patches], **hidden)

        def click_token(session, lay, hd, med, evt: gr.SelectData):
            return evt.index, render_attention(_current(session), processor, evt.index, lay, hd, med)

        tokens.select(click_token, [session, layer, head, media], [token, overlay], **hidden)
    return demo
