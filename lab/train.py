"""The Qwen2-VL training recipe in miniature: trains the lab's own nano model on the synthetic world.

Stage 0 stands in for the paper's starting points, in two parts: the language model warms up on text alone
("initialised from Qwen2"), and the ViT + merger learn to name the kind and colour of the shape, the written
digit and its place in the number, the motion, and how many shapes the picture holds, under each merged token,
from dense labels ("initialised from DFN's ViT"). Those linear heads stay on as an auxiliary loss in stages 1
and 2 (there the digit head is also scored once per written digit, on the mean of its tokens: `pool_digits`) and
are thrown away at the end.
Then come the paper's three stages (Qwen2-VL section 2.3): 1) the LLM is frozen and the ViT and merger learn
from image-caption pairs; 2) everything trains on the mixed data; 3) the ViT is frozen and the LLM is
instruction-tuned on ChatML conversations, with the loss on the assistant's tokens only.
Stage 3 also teaches the LLM to look up the object a question names (the binding problem) and to say where it
is, with two more auxiliary losses (`ground=True`, `point=True`): linear heads on the LLM's hidden states ask, at
the words that name an object ("circle", "red"), for what the word does not say of it and for its region, at the
visual tokens for their row and column (which only M-RoPE can tell them) and their kind and colour, and where an
answer's colour, kind, count or region is predicted, for it; attention heads are taught to point, from such a word
to the object's visual tokens and from the answer to the word, and from each digit of a written number's answer
to that digit's visual tokens (ground_labels and point_targets say why, and what they measured).
Run it with `python -m lab.train` (seeded; under 30 min on 2 CPU cores);
`torchrun --nproc_per_node=N -m lab.train` runs the same script under DistributedDataParallel; `--resume` goes on
after the last stage an interrupted run finished.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import qwen2vl_min as q
from qwen2vl_min.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_min.rope import apply_rope, mrope_position_ids

from . import synthetic

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]   # Qwen2-VL's, in its order
NANO_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "qwen2vl-nano"
TOKENS_PER_IMAGE = 64                    # the nano's pixel cap: at most 64 merged tokens (8x8) per image
IGNORE = -100                            # label of positions that carry no loss


# ---------------------------------------------------------------- tokenizer, config, processor
def corpus(seed: int = 0, n: int = 4000):
    """Every kind of text the world produces: questions, answers, captions, the chat template's words."""
    rng = random.Random(seed)
    texts = ["system", "user", "assistant", q.processor.DEFAULT_SYSTEM, synthetic.REFUSAL, synthetic.GREETING_ANSWER]
    texts += list(synthetic.OFF_TOPIC) + list(synthetic.GREETINGS)
    for _ in range(n):
        for m in sample_example(rng)["messages"]:
            content = m["content"]
            texts += [content] if isinstance(content, str) else [c["text"] for c in content if "text" in c]
    return texts


def build_tokenizer(texts, vocab_size: int = 1024):
    """Byte-level BPE (any UTF-8 text encodes), the Qwen2-VL special tokens after the learned vocabulary.
    Digits are split one by one, as Qwen2's tokenizer does, so "742" is read and written digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


ROPE_THETA, MROPE_SECTION = 100.0, (4, 6, 6)


def nano_config(tok, rope_theta=ROPE_THETA, mrope_section=MROPE_SECTION) -> Qwen2VLConfig:
    """A genuine Qwen2-VL config, small: ViT 4 x 128, LLM 4 x 256, head_dim 32 with mrope_section [4, 6, 6].

    Why rope_theta = 100 and not Qwen2's 10000: head_dim 32 has 16 rotary pairs, and the w rows get the
    slowest six. At theta 10000 those turn by less than 0.04 rad across a whole 11-token-wide image, so the
    model could not tell left from right; at 100 they turn by 0.14-0.6 rad."""
    vocab = math.ceil(tok.get_vocab_size() / 64) * 64
    text = TextConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=rope_theta,
                      mrope_section=tuple(mrope_section), max_position_embeddings=1024, tie_word_embeddings=True)
    vision = VisionConfig(depth=4, embed_dim=128, num_heads=4, mlp_ratio=4, hidden_size=256)
    ids = {name: tok.token_to_id(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    return Qwen2VLConfig(text=text, vision=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                         vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])


def init_weights(model, std=0.02):
    """Small normal weights, zero biases (as transformers initialises Qwen2-VL); norms keep ones / zeros.
    PyTorch's defaults (N(0, 1) embeddings, tied to the output layer) start the loss near 40."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
    return model


def nano_processor(tok) -> q.Processor:
    """Images capped at 64 tokens; video frames at 16 tokens per temporal patch (an 8-frame clip = 64)."""
    return q.Processor(tok, min_pixels=4 * 28 * 28, max_pixels=TOKENS_PER_IMAGE * 28 * 28,
                       chat_template=q.processor.QWEN2VL_CHAT_TEMPLATE,
                       video_pixels={"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28})


# ---------------------------------------------------------------- data
def text_document(rng):
    """Stage 0's text: a few of the world's questions and answers run together as one user message, so the
    LLM learns the world's words (as Qwen2 knew English) without ever pairing a question with an image."""
    parts = []
    for _ in range(rng.randint(2, 4)):
        ex = synthetic.sample_example(rng)
        for m in ex["messages"]:
            content = m["content"]
            parts += [content] if isinstance(content, str) else [c["text"] for c in content if "text" in c]
    return {"category": "text_document", "messages": [{"role": "user", "content": " ".join(parts)}]}


def sample_example(rng, weights=None):
    """An example of the synthetic world, or a text document when the weights ask for "text_document"."""
    weights = weights or synthetic.DEFAULT_WEIGHTS
    if rng.random() < weights.get("text_document", 0.0) / sum(weights.values()):
        return text_document(rng)
    return synthetic.sample_example(rng, {k: v for k, v in weights.items() if k != "text_document"})


def labels_for(input_ids, attention_mask, processor, loss_on: str):
    """Which next tokens are trained. (B, L) -> (B, L) token ids, IGNORE elsewhere.

    "assistant": the answers and their <|im_end|> (so the model learns to stop) — stages 1 and 3.
    "text": every real text token, the questions too (pretraining style) — stages 0 and 2.
    """
    labels = torch.full_like(input_ids, IGNORE)
    if loss_on == "text":
        keep = attention_mask.bool() & (input_ids != processor.image_token_id) & (input_ids != processor.video_token_id)
        return labels.masked_scatter(keep, input_ids[keep])
    head = turn_header(processor, "assistant")
    end = processor.eos_token_ids[0]                                        # <|im_end|>
    for b, row in enumerate(input_ids.tolist()):
        for i in header_ends(row, head):                                    # the answer runs from i + 1 ...
            j = row.index(end, i + 1) if end in row[i + 1:] else len(row) - 1   # ... to its <|im_end|>
            labels[b, i + 1:j + 1] = input_ids[b, i + 1:j + 1]
    return labels


def turn_header(processor, role: str) -> list[int]:
    """The ids that open a ChatML turn of `role`: "<|im_start|>assistant\n"."""
    return processor.tokenizer.encode(f"<|im_start|>{role}\n", add_special_tokens=False).ids


def answer_words(row: list[int], i: int, processor) -> range:
    """The positions that predict the words of the answer whose header ends at i, before its closing ".":
    "top left." -> i, i + 1 (the second predicts " left"); "red." -> i."""
    end = processor.eos_token_ids[0]
    j = row.index(end, i + 1) if end in row[i + 1:] else len(row)                # <|im_end|>
    dot = processor.tokenizer.encode(".", add_special_tokens=False).ids[0]
    return range(i, max(i + 1, j - 1 - (row[j - 1] == dot)))


def header_ends(row: list[int], header: list[int]) -> list[int]:
    """Where each occurrence of `header` in a row of ids ends (the index of its last token)."""
    n = len(header)
    return [i + n - 1 for i in range(len(row) - n + 1) if row[i:i + n] == header]


def approx_len(example) -> int:
    """A cheap guess of an example's token count, to group similar lengths (less padding per batch)."""
    n = 0
    for m in example["messages"]:
        for c in [{"text": m["content"]}] if isinstance(m["content"], str) else m["content"]:
            if "image" in c:
                n += min(TOKENS_PER_IMAGE, c["image"].width * c["image"].height // 784)
            elif "video" in c:
                n += 8 * len(c["video"])
            else:
                n += len(c.get("text", "")) // 4
    return n


def batches(rng, weights, batch_size, group=4):
    """Endless batches of examples: draw `group` batches' worth, sort by length, deal them out shuffled."""
    while True:
        pool = sorted((sample_example(rng, weights) for _ in range(batch_size * group)), key=approx_len)
        chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def make_batch(processor, examples, loss_on):
    batch = processor.batch([ex["messages"] for ex in examples], add_generation_prompt=False)
    return batch, labels_for(batch.input_ids, batch.attention_mask, processor, loss_on)


def positions(batch, config, mode: str):
    """M-RoPE ids (3, B, L), or the ablation: plain 1D positions (all three rows = the token index)."""
    if mode == "mrope":
        return mrope_position_ids(batch.input_ids, batch.image_grid_thw, batch.video_grid_thw,
                                  batch.attention_mask, config)[0]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return pos[None].expand(3, -1, -1)


def chat_inputs(batch, config, pos_mode="mrope") -> dict:
    """The model's keyword arguments for a processed batch, with M-RoPE or the ablation's 1D position ids."""
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                image_grid_thw=batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
                video_grid_thw=batch.video_grid_thw,
                position_ids=positions(batch, config, pos_mode).to(batch.input_ids.device))


def token_loss(logits, labels):
    """Cross-entropy of each trained next token: logits (B, L, V) at position i predict labels[:, i + 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def next_token_loss(model, config, batch, labels, pos_mode="mrope"):
    return token_loss(model(**chat_inputs(batch, config, pos_mode)), labels)


CELL_CLASSES = (len(synthetic.SHAPES) + 1, len(synthetic.COLORS) + 1, 11, 4, len(synthetic.DIRECTIONS) + 1, 4, 4)
# under each merged token; 0 = none (label_maps); then how many shapes its picture holds (0-3, every cell) and how
# many of its own kind (1-3 under a shape, 0 elsewhere)
CELL_NAMES = ("kind", "colour", "digit", "place", "motion", "count", "kind count")
CELL_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 0.3, 0.3)   # the counts at 0.3: at 1.0 they slowed the others (below)
# How many of the cell loss's scenes carry a written number. At 0.3 the ViT warm-up did not learn a digit's place
# (56 % of the digits' tokens after 1,200 steps), at 0.8 it did (87 %); docs/experiments/number-reading.md.
NUMBER_SHARE = 0.8


def resized(label_map, h: int, w: int) -> torch.Tensor:
    """A label map (PIL "L") resized to the media's h x w pixels as the processor resizes it: (h, w) long classes."""
    from PIL import Image
    return torch.frombuffer(bytearray(label_map.resize((w, h), Image.NEAREST).tobytes()), dtype=torch.uint8).view(
        h, w).long()


def cell_pixels(classes: torch.Tensor, n: int, side: int) -> torch.Tensor:
    """(h, w) classes in [0, n) -> (cells, n): how many pixels of each class each side x side merged token holds."""
    h, w = classes.shape
    # (h, w) -> (h/28, 28, w/28, 28) -> (cells, 784): the pixels of each merged token, in raster order
    cells = classes.view(h // side, side, w // side, side).permute(0, 2, 1, 3).reshape(-1, side * side)
    slot = cells + n * torch.arange(len(cells)).unsqueeze(1)            # (cells, 784): (cell, class) -> one bin
    return torch.bincount(slot.flatten(), minlength=len(cells) * n).view(-1, n)


def majority(counts: torch.Tensor, side: int) -> torch.Tensor:
    """(cells, n) pixels of each class -> (cells,): the class other than 0 covering most of a cell if it covers at
    least a sixteenth of it (a video frame's small shapes straddle cells), else 0 (background)."""
    best = counts[:, 1:].max(1)
    return torch.where(best.values * 16 >= side * side, best.indices + 1, 0)


def cell_labels(item, processor, grid=None) -> tuple[torch.Tensor, ...]:
    """(kind, colour, digit, place, motion) class under each merged 28x28 token of a Scene or a Clip, (n,) each,
    in the ViT's order (temporal patch, row, column); a cell takes the class covering most of it if that covers
    at least a sixteenth of it (a video frame's small shapes straddle cells), else 0. Then the two counts
    (CELL_NAMES): how many shapes the picture holds, at every cell, and how many of the cell's own kind.
    `grid` = the media's (t, h, w) patch grid (computed by the processor if None).

    Why counts in the ViT: counting is what attention does badly. A word that looks at all the shapes' tokens
    gets their average, which is the same for one shape as for three; the LLM answered 84 % of count questions
    (three shapes: 67 %) and 80.5 % of "Which image has more shapes?". The ViT sees the whole picture at once,
    with four layers to find how many objects it holds; asked to put the answer under every token, it hands the
    LLM a number to copy instead of a sum to make. ViT warm-up alone (1,200 steps, seed 0, 96 held-out
    pictures; clips and background cells had no count target there): a linear head on a token names its
    picture's count 100 / 91 / 84 % of the time (1 / 2 / 3 shapes) at weight 1.0, 99 / 80 / 84 % at 0.3; at 1.0
    the kind head fell from 64 to 54 % and the motion head from 75 to 33 % (at 0.3: 63 and 72 %). After the
    whole recipe the count head is right under 94 % of the cells, and the LLM (which also learned to fetch the
    count: "shapes" in point_targets, the answer's count in ground_labels) answers 91.5 % of count questions
    (84 % before; three shapes 53 of 69, before 46) and 98.5 % of "Which image has more shapes?" (80.5 %).
    The price: the kind head is right under 84 % of the shapes' cells (91 % before)."""
    clip = isinstance(item, synthetic.Clip)
    if grid is None:
        grid = processor.encode_media(synthetic.media_item(item))[1][0].tolist()
    side = processor.patch_size * processor.merge_size
    h, w = grid[1] * processor.patch_size, grid[2] * processor.patch_size
    per_t = []
    for t in range(grid[0]):                    # a temporal patch sees frames 2t and 2t + 1 (an image: twice)
        maps = synthetic.clip_label_maps(item, min(2 * t, len(item.frames) - 1)) if clip else synthetic.label_maps(item)
        out = []
        per_t.append([majority(cell_pixels(resized(label_map, h, w), n, side), side)   # (cells,) each
                      for label_map, n in zip(maps, CELL_CLASSES)])
    kind, *rest = (torch.cat(labels) for labels in zip(*per_t))
    shapes = ((item.moving,) + ((item.static,) if item.static else ())) if clip else item.shapes
    of_kind = torch.tensor([0] + [sum(s.kind == k for s in shapes) for k in synthetic.SHAPES])   # by kind class
    return (kind, *rest, torch.full_like(kind, len(shapes)), of_kind[kind])


class CellHeads(torch.nn.Module):
    """Linear heads that name, for each merged token the ViT + merger put out, the kind and colour of the shape,
    the digit and its place in the number, and the motion under it, and how many shapes its picture holds (all,
    and of its kind): the ViT warm-up's task, and an auxiliary loss later. Never saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in CELL_CLASSES)

    def forward(self, f):                                               # (N/4, C): one row per merged token
        return tuple(head(f) for head in self.heads)


# ---------------------------------------------------------------- stage 3: teaching the LLM to look things up
GRID_SIDE = 16       # a visual token is asked for its merged row and column up to 15 (the world's canvases need 12)
# The grounding heads: (what a head names, its classes, after how many of the LLM's 4 layers it reads the residual
# stream, its loss weight). ground_labels says at which tokens and why.
GROUNDS = (("colour", len(synthetic.COLORS), 1, 1.0),   # at a word naming one object: what the word does not say
           ("kind", len(synthetic.SHAPES), 1, 1.0),
           ("count", 4, 1, 1.0),                        # at a plural: how many (0-3)
           ("region", len(synthetic.REGIONS), 2, 1.0),  # at a word naming one object: where it is
           ("row", GRID_SIDE, 1, 1.0),                  # at every visual token of an image: its merged row ...
           ("column", GRID_SIDE, 1, 1.0),               # ... and column
           ("answer colour", len(synthetic.COLORS), 2, 1.0),   # where an answer's colour word is predicted: it
           ("answer count", 4, 2, 1.0),                 # where a count question's answer is predicted: the count
           ("answer kind", len(synthetic.SHAPES), 2, 1.0),     # where an answer's shape word is predicted: it
           ("answer region", len(synthetic.REGIONS), 3, 1.0),  # where a region's words are predicted: the region
           ("token kind", len(synthetic.SHAPES) + 1, 1, 1.0),   # at every visual token of a scene: its kind ...
           ("token colour", len(synthetic.COLORS) + 1, 1, 1.0),  # ... and colour (0 = none), kept for layer 1
           ("colour before", len(synthetic.COLORS), 1, 1.0),    # at "circle" in "the red circle": red, carried
           ("centre row", 12, 2, 1.0),                  # at a word naming one object: its centre's row, in twelfths
           ("centre column", 12, 2, 1.0),               # ... and column, finer than the region's thirds
           ("token place", 4, 1, 1.0),                  # at every visual token of a scene: its written digit's place
           ("answer place", 3, 1, 1.0),                 # where a digit of the written number is predicted: which
           ("answer digit", 10, 3, 1.0))                # of its digits comes (first, second, third), then that digit
GROUND_NAMES = tuple(g[0] for g in GROUNDS)


def ground_words(tokenizer) -> dict[int, tuple[str, str]]:
    """Token id -> (what the word names, the name): " circle" -> ("kind", "circle"), " circles" -> ("kinds",
    "circle"), " red" -> ("color", "red"), " shapes" / " objects" -> ("all", ""). A word the tokenizer splits
    into several tokens is left out (the nano's tokenizer keeps every one whole; tests/test_lab_train.py checks)."""
    words = {f" {k}": ("kind", k) for k in synthetic.SHAPES} | {f" {k}s": ("kinds", k) for k in synthetic.SHAPES}
    words |= {f" {c}": ("color", c) for c in synthetic.COLORS} | {" shapes": ("all", ""), " objects": ("all", "")}
    ids = {word: tokenizer.encode(word, add_special_tokens=False).ids for word in words}
    return {i[0]: words[word] for word, i in ids.items() if len(i) == 1}


def image_spans(examples, batch, processor) -> list[list[tuple[int, int, int]]]:
    """Per row of a batch, (first token, merged rows, merged columns) of each of its images, in order (the batch's
    image_grid_thw holds the grids of all rows' images one after another)."""
    grids, m = ([] if batch.image_grid_thw is None else batch.image_grid_thw.tolist()), processor.merge_size
    out, image = [], 0
    for b, ex in enumerate(examples):
        row, spans, at = batch.input_ids[b].tolist(), [], 0
        for message in ex["messages"]:
            for item in ([] if isinstance(message["content"], str) else message["content"]):
                if item.get("type") == "image":
                    t, h, w = grids[image]
                    at, image = row.index(processor.image_token_id, at), image + 1
                    spans.append((at, h // m, w // m))
                    at += t * h * w // m ** 2
        out.append(spans)
    return out


def scene_cells(examples, batch, processor) -> list:
    """Per row of a batch: for a chat about one scene, (its image's first token, merged rows h, merged columns w,
    kind (h*w,), colour (h*w,), place (h*w,), cover (h*w, 1 + kinds, 1 + colours)): the scene's cell labels
    (cell_labels; place: 1-3 = the token shows the first, second, third written digit) on the merged grid, in the
    LLM's token order, and the share of each token's pixels of each kind and colour; None for
    any other row (text only, two images, a clip). ground_labels and point_targets both read it, so
    train_stage makes it once per batch."""
    out, m = [], processor.merge_size
    for ex, spans in zip(examples, image_spans(examples, batch, processor)):
        if len(ex["world"]) != 1 or not isinstance(ex["world"][0], synthetic.Scene):
            out.append(None)
            continue
        start, h, w = spans[0]
        side, (kinds, colours, _, places, _) = m * processor.patch_size, synthetic.label_maps(ex["world"][0])
        n = len(synthetic.COLORS) + 1
        # one class per pixel for its (kind, colour) pair: kind * n + colour, 0 = background
        both = resized(kinds, h * side, w * side) * n + resized(colours, h * side, w * side)   # (h*28, w*28)
        pixels = cell_pixels(both, n * (len(synthetic.SHAPES) + 1), side).view(h * w, -1, n)  # (h*w, kinds, colours)
        kind, colour = majority(pixels.sum(2), side), majority(pixels.sum(1), side)   # = cell_labels', (h*w,) each
        place = majority(cell_pixels(resized(places, h * side, w * side), 4, side), side)            # (h*w,)
        out.append((start, h, w, kind, colour, place, pixels / side ** 2))   # cover: each pair's share of each token
    return out


def ground_labels(examples, batch, processor, cell_maps=None) -> tuple[torch.Tensor, ...]:
    """The grounding heads' targets, one (B, L) class table per head of GROUNDS, IGNORE where a token has none:
    - at each word of a chat about one scene that names exactly one of its shapes ("circle", "red", "the red
      circle"), what the word does not say of that shape (at a kind word its colour, at a colour word its kind),
      and where it is (its region, and its centre's row and column in twelfths of the picture); at a plural
      ("circles", "shapes"), how many there are;
    - at every visual token of every image, its merged row and column in the image's grid; in a chat about one
      scene also its kind and colour (its cell labels), read after 1 layer like the row and column;
    - at "circle" in "the red circle", the colour of the word before it ("colour before", after 1 layer);
    - at the position that predicts an answer's colour word ("red."), that colour, after 2 layers: just after the
      answer's hop to the question's word (ANSWER_TO_WORD); likewise where an answer's shape word ("circle.") is
      predicted, that kind, and where a count question's answer ("How many circles are there?" -> "2."), the
      count of the question's plural; where the words of a region are predicted ("top" and " left" of "top
      left."), the region, after 3 layers (the answer fetches it from the word in layer 2, ANSWER_TO_PLACE).

    Why the words: asked "What color is the circle?" with other shapes in the picture, the answer position must
    find which kind the question named *and* look that kind up among the visual tokens: two hops in one forward
    pass, which the nano's LLM does not discover from the answers alone (it names another shape's colour about half
    the time). These targets teach the second hop where it is one hop: at the word "circle" itself. The answer then
    only has to copy it from there. Measured on an earlier nano (grounding after 2 layers then; ViT frozen,
    800 steps of colour questions only): 71.5 % right without these targets, 100 % with them. In the mixed data
    they bind only together with the pointing loss (point_targets), which shows the word where to look.

    Why the rows and columns: the ViT cannot say where anything is. It has no absolute position embedding (2D RoPE
    sees only offsets), and on a plain background every background patch is the same, so its attention averages
    equal values wherever it looks: a linear probe on the nano's visual tokens finds a shape's region 19 % of the
    time (chance 11 %), and a region head added to the ViT warm-up reached 17 %. Only the LLM knows where a visual
    token sits: M-RoPE gives it the ids (t, row, column) offset from the text before the image, which differs from
    token to token, so a token can read its own row and column off its attention to that text. These targets teach
    it to, in the first layer; the words then fetch them in the second (point_targets) and learn the region there,
    which needs the grid's size as well as the row and column (a region is a third of the picture).
    Measured from the recipe's stage-2 weights (seed 0; stage 3 re-run, 200 held-out questions per category):
    without the row and column targets position stays at 22.5 % (the checkpoint before them: 20.5 %), with them
    it is 70 % (one-shape pictures 95 %), and at a fifth of their weight 57 %. The price is colour questions on
    crowded pictures: every variant of the position losses tried (eight, one without the row and column targets)
    answered 88-89.5 % of them (one 78.5 %, the one at a fifth of the weight 94 %), against 98 % without any.

    Why the answer's colour: that price was paid in the answer's copy, not in the look-up. On colour questions
    about 2-3-shape pictures, a linear probe finds the named shape's colour at the question's word after layer 0
    99.6 % of the time with the position targets as without them, and ANSWER_TO_WORD puts all its weight (1.000)
    on that word, right answers and wrong alike; but after layer 1, at the answer, the probe found it 91 % of the
    time (without the position targets 99.6 %). Asked for there, it stays (99.6 %), and colour questions went
    from 88 % to 100 % (stage 3 re-run from the same stage-2 weights; position 70 -> 60 %, within what single
    runs of this stage vary: 42-75 % over nine variants with the row and column targets).

    The answer's kind and count are asked for the same way. Kind: with the ViT's count heads (cell_labels) shape
    questions fell to 95 %; asked at the answer, 97 % (stage 3 re-run from the same stage-2 weights; count 92.5
    -> 91.5 %, position 64.5 -> 56 %, within the spread above).

    Why the visual tokens' kind and colour, and the colour before: position questions about two or three shapes
    failed at the look-up in layer 1 (WORD_TO_PLACE), where the word finds the named shape again to read its row and
    column. A linear probe for the named shape's region at the question's last word ("circle" of "Where is the red
    circle?", after layer 2) was right 98 % of the time with one shape, 79 % when the circle was the only circle,
    30 % when it was not; there WORD_TO_PLACE put 0.40 of its weight on the red circle. To find it by both words in
    layer 1, "circle" must know the word before it (in layer 0 a query knows only its own word, so point_targets
    asks layer 0 for every circle), and the visual tokens must still show their kind and colour after layer 0 (the
    LLM's first layer adds colour features that drown the kind). With these targets, the region asked at both words
    of the answer, and every word of the answer pointing at the question's word (the second word of "top left." had
    been right 71 % of the time when the first was; now 87 %): weight 0.79 on the red circle, the probe
    94 / 84 / 76 % (one shape / the only circle / not), position 56 -> 73.5 % (one shape 60 -> 68 of 73, two 34 ->
    43 of 62, three 18 -> 36 of 65), colour 100 -> 99.5 % (stage 3 re-run from the same stage-2 weights; with two
    other data orders 53.5 and 69 %, where the old targets gave 48 and 57.5 %: single runs of this stage vary by 20
    points). Parts alone, from the same weights: the visual tokens' labels, the region answer and layer 0 by the
    word alone 55 %; every answer word pointing and the region answer 52 %; all of it with the colour before asked
    on the colour head (not a head of its own) 72.5 %, but colour questions fell to 93.5 %.

    Why the centre in twelfths: a region is a third of the picture, and most wrong regions were a row or a column
    off for a shape close to a third's edge (one-shape pictures: every miss within 0.75 of a token of the edge).
    The region's nine classes say only which side of the edge; the centre's twelve say how far, a finer target
    for the same average of rows and columns (with the shares of point_targets, the average is the centre).
    Stage 3 from the same stage-2 weights, two data orders: position 87 / 84.5 % without the shares and these
    heads, 90 / 84.5 % with both; colour 99 / 95.5 -> 95 / 93 % (single runs of this stage vary by several points,
    so the gain is smaller than the spread; the price in colour showed in both orders)."""
    words, col = ground_words(processor.tokenizer), list(synthetic.COLORS)
    cell_maps = scene_cells(examples, batch, processor) if cell_maps is None else cell_maps
    out = {name: torch.full_like(batch.input_ids, IGNORE) for name in GROUND_NAMES}
    opening = lambda names: {ids[0]: k for k, ids in enumerate(processor.tokenizer.encode(
        n, add_special_tokens=False).ids for n in names) if len(ids) == 1}         # "red" opening an answer -> 0
    said = {"answer colour": opening(col), "answer kind": opening(synthetic.SHAPES)}
    user, answer = turn_header(processor, "user"), turn_header(processor, "assistant")
    for b, spans in enumerate(image_spans(examples, batch, processor)):
        for start, h, w in spans:
            cell = torch.arange(h * w)                                       # merged tokens in raster order
            out["row"][b, start:start + h * w] = (cell // w).clamp(max=GRID_SIDE - 1)
            out["column"][b, start:start + h * w] = (cell % w).clamp(max=GRID_SIDE - 1)
    for b, (ex, scene) in enumerate(zip(examples, cell_maps)):
        if scene is None:
            continue                                  # text only, two images or a clip: no words to ground
        shapes, row = ex["world"][0].shapes, batch.input_ids[b].tolist()
        start, h, w, kind, colour, place, _ = scene                  # kind, colour, place: (h*w,) per merged token
        out["token kind"][b, start:start + h * w], out["token colour"][b, start:start + h * w] = kind, colour
        out["token place"][b, start:start + h * w] = place
        for i, k in digit_spots(ex, row, processor):
            out["answer place"][b, i], out["answer digit"][b, i] = k, int(str(ex["world"][0].number)[k])
        questions, answers, asked = set(header_ends(row, user)), set(header_ends(row, answer)), None
        told = [msg["content"].rstrip(".") for msg in ex["messages"] if msg["role"] == "assistant"]
        for content, i in zip(told, header_ends(row, answer)):
            if content in synthetic.REGIONS:          # "top left": both of its words
                out["answer region"][b, answer_words(row, i, processor)] = synthetic.REGIONS.index(content)
        for i in answers:
            for name, first in said.items():
                if i + 1 < len(row) and row[i + 1] in first:
                    out[name][b, i] = first[row[i + 1]]
        for i, token in enumerate(row):
            if i in answers and asked is not None:    # a count question's answer: the count of its plural
                out["answer count"][b, i] = asked
            if i in questions or i in answers:        # a new turn: no plural asked yet
                asked = None
            what, name = words.get(token, (None, None))
            if what in ("kinds", "all"):
                out["count"][b, i] = asked = sum(what == "all" or s.kind == name for s in shapes)
                continue
            before = words.get(row[i - 1], (None, None)) if i else (None, None)
            if what == "kind":
                named = [s for s in shapes if s.kind == name]
                if before[0] == "color":              # "the red circle": the colour before narrows it down
                    named = [s for s in named if s.color == before[1]]
            elif what == "color":
                named = [s for s in shapes if s.color == name]
            else:
                continue
            if len(named) == 1:
                out["region"][b, i] = synthetic.REGIONS.index(named[0].region)
                (x0, y0, x1, y1), (cw, ch) = named[0].box, ex["world"][0].image.size
                out["centre row"][b, i] = min(11, int((y0 + y1) / 2 * 12 / ch))
                out["centre column"][b, i] = min(11, int((x0 + x1) / 2 * 12 / cw))
                if what == "color":
                    out["kind"][b, i] = synthetic.SHAPES.index(named[0].kind)
                elif before[0] != "color":            # the colour it looked up
                    out["colour"][b, i] = col.index(named[0].color)
                else:                                 # in "the red circle": the word before, carried over
                    out["colour before"][b, i] = col.index(before[1])
    return tuple(out[name] for name in GROUND_NAMES)


class GroundHeads(torch.nn.Module):
    """Linear heads on the LLM's residual stream, one per entry of GROUNDS, each reading after its own number of
    layers: the auxiliary loss of a Stage with `ground` (see ground_labels). Never saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for _, n, _, _ in GROUNDS)

    def forward(self, hidden: dict):                        # layers run -> (B, L, C): the LLM's hidden states there
        return tuple(head(hidden[after]) for head, (_, _, after, _) in zip(self.heads, GROUNDS))


# Where stage 3 teaches attention heads to look (point_targets): (layer, head) of each hop.
WORD_TO_OBJECT = (0, 0)   # a word naming objects -> their visual tokens: the look-up by kind or colour
ANSWER_TO_WORD = (1, 0)   # the answer -> the question's last such word (after layer 0 it holds the colour or kind)
WORD_TO_PLACE = (1, 1)    # the question's word -> the objects' visual tokens again, which now know their row and
                          # column ...
WORD_TO_CORNER = (1, 2)   # ... and -> the image's last visual token, which knows the grid's size
ANSWER_TO_PLACE = (2, 0)  # the answer -> the word again (after layer 1 it holds where the object is)
DIGIT_BEFORE = (0, 4)     # where the k-th digit of a written number is predicted -> the token before: a digit
                          # there means k = 3, the answer's opening k = 2 (a key/value pair of their own: pair 2)
ANSWER_TO_DIGIT = (2, 4)  # ... -> the k-th written digit's visual tokens, found by their place (ground_labels)


def digit_spots(example, row: list[int], processor) -> list[tuple[int, int]]:
    """(position that predicts the k-th digit, k - 1) for every answer of a one-scene chat that says its written
    number: the answer to a number question ("742.") and a caption's "... and the number 742.". Both end with the
    digits, each its own token (the tokenizer splits digits), then "." and <|im_end|>. (A count's "1." is not one,
    even where the number is 1.) Empty if the scene has no number."""
    number = example["world"][0].number
    if number is None:
        return []
    text, end, question = str(number), processor.eos_token_ids[0], ""                # end: <|im_end|>
    answers, said = iter(header_ends(row, turn_header(processor, "assistant"))), []
    for m in example["messages"]:
        content = m["content"] if isinstance(m["content"], str) else " ".join(c.get("text", "") for c in m["content"])
        if m["role"] == "user":
            question = content.strip()
        elif m["role"] == "assistant":
            i = next(answers)
            if content == f"{text}." and question in synthetic.TEMPLATES["number"] or \
                    content.endswith(f" number {text}."):
                said.append(i)
    out = []
    for i in said:
        first = (row.index(end, i + 1) if end in row[i + 1:] else len(row)) - 2 - len(text)     # predicts digit 1
        out += [(first + k, k) for k in range(len(text))]
    return out


def point_targets(examples, batch, processor, cell_maps=None) -> list[tuple]:
    """Where the pointing heads should look: (layer, head, row, query position, key positions (n,), shares (n,) or
    None) per target; None: any split of the weight among the keys will do.

    In a chat about one scene, at every word that names objects of it ("circle", "red", "squares", "shapes" all of
    them), head WORD_TO_OBJECT should put its weight on those objects' visual tokens (whose ViT features say how
    many of them the picture holds: cell_labels); at each position that predicts a word of an answer ("top" and
    " left" of "top left."), ANSWER_TO_WORD should look at the last such word of the question.
    Two hops, each taught where it is one hop. For where things are, two more of each: in layer 1 the question's
    word looks at the objects again (WORD_TO_PLACE; "circle" in "the red circle" now at the red one only, as it
    knows the word before: ground_labels) and at the image's last token (WORD_TO_CORNER), and in layer 2 the
    answer fetches the word once more (ANSWER_TO_PLACE). (The words of the last answer, after the last question,
    are not marked, as in the runs that measured this.) WORD_TO_PLACE alone asks for a split: each token that the
    named shape covers, by how much of it the shape covers (below).

    Why layer 0 for the look-up: at the merger's output a visual token's kind is a fifth of its variance, but
    after the LLM's first layer the colour features it adds leave the kind 3 % (measured on an earlier nano), so
    the look-up by kind has to happen in layer 0, and it can only happen at the word, where the kind is known.
    Why layer 1 for the place: a visual token learns its row and column in layer 0 (ground_labels), so only
    from layer 1 on do its values carry where it is.
    Why the shares: the word reads the shape's row and column as the average over the tokens it looks at, which
    is the shape's centre only if each token counts by how much of the shape it holds. With the weight spread
    anyhow over the shape's tokens the average is off by up to half a token, and a region is a third of the grid,
    which on a small picture is 1.3 tokens: a shape's region was named right 7 times in 12 when its centre lay
    within half a token of a third's edge. The word's query cannot see the pixels, but the keys can: the ViT's
    tokens show how much of them a shape fills. Stage 3 from the same stage-2 weights (position questions at 2.5,
    one data order): position 87 -> 89 % with the shares (within half a token of an edge 7 -> 9 of 12 right)."""
    words, kinds, colours = ground_words(processor.tokenizer), list(synthetic.SHAPES), list(synthetic.COLORS)
    user, answer = turn_header(processor, "user"), turn_header(processor, "assistant")
    out = []
    for b, scene in enumerate(scene_cells(examples, batch, processor) if cell_maps is None else cell_maps):
        if scene is None:
            continue                          # text only, two images or a clip: nothing to point at
        (start, h, w, kind, colour, place, cover), row = scene, batch.input_ids[b].tolist()   # (h*w,) per token
        corner = torch.tensor([start + h * w - 1])
        for i, k in digit_spots(examples[b], row, processor):       # read the k-th written digit (k = 0, 1, 2)
            shows = (place == 1 + k).nonzero()[:, 0]
            if len(shows):                        # evenly: their mean is what the ViT's digit head reads (cell_loss)
                out += [(*DIGIT_BEFORE, b, i, torch.tensor([i - 1]), None),
                        (*ANSWER_TO_DIGIT, b, i, start + shows, torch.full((len(shows),), 1 / len(shows)))]
        questions, answers = set(header_ends(row, user)), header_ends(row, answer)
        # who is speaking (the image opens the first user turn), and the latest word of this question naming objects
        speaker, last = "user", None
        for i in range(start + h * w, answers[-1] + 1 if answers else 0):         # to the last answer
            if i in questions:
                speaker, last = "user", None
            elif i in answers:
                if last is not None:
                    word = torch.tensor([last])
                    for k in answer_words(row, i, processor):     # every word of the answer looks the word up
                        out += [(*ANSWER_TO_WORD, b, k, word, None), (*ANSWER_TO_PLACE, b, k, word, None)]
                speaker, last = "assistant", None
            what, name = words.get(row[i], (None, None))
            share = cover[:, 1:, 1:]                           # (h*w, kinds, colours): what the word may name
            if what in ("kind", "kinds"):
                cells, share = kind == 1 + kinds.index(name), share[:, kinds.index(name)]
                before = words.get(row[i - 1], (None, None))
                if before[0] == "color":                       # "the red circle": the red one (layer 1 only)
                    share = share[:, colours.index(before[1])]
            elif what == "color":
                cells, share = colour == 1 + colours.index(name), share[:, :, colours.index(name)]
            elif what == "all":                                # "shapes", "objects": every shape
                cells = kind > 0
            else:
                continue
            share = share.reshape(h * w, -1).sum(1)            # (h*w,): how much of each token the named shapes cover
            if cells.any():
                out.append((*WORD_TO_OBJECT, b, i, start + cells.nonzero()[:, 0], None))
                if speaker == "user" and share.any():
                    last, on = i, share.nonzero()[:, 0]
                    out += [(*WORD_TO_PLACE, b, i, start + on, share[on] / share[on].sum()),
                            (*WORD_TO_CORNER, b, i, corner, None)]
    return out


def point_loss(attention: dict, marks) -> torch.Tensor:
    """Mean over the marks of -log(the weight the mark's head gives its key positions), or where the mark gives
    each key a share, the cross-entropy of the weights against the shares: softmax(q k^T / sqrt(D)) of the
    rotated query and keys, exactly what the layer's SDPA call computed. `attention`: layer -> (q (B, L, H*D),
    k (B, L, K*D), cos (B, L, D), sin, mask (B, 1, L, L) bool or None = causal), caught by Trainee's hooks."""
    losses = []
    for layer, head, b, i, keys, share in marks:
        q, k, cos, sin, mask = attention[layer]
        D = cos.shape[-1]
        H, K = q.shape[-1] // D, k.shape[-1] // D
        qi = q[b, i].view(H, D)[head]                                        # (D,)
        kj = k[b, :i + 1].view(i + 1, K, D)[:, head // (H // K)]            # GQA: its kv head, (i+1, D)
        qi, kj = apply_rope(qi, cos[b, i], sin[b, i]), apply_rope(kj, cos[b, :i + 1], sin[b, :i + 1])
        scores = kj @ qi / math.sqrt(D)                                      # (i+1,)
        if mask is not None:                                                 # left padding
            scores = scores.masked_fill(~mask[b, 0, i, :i + 1], float("-inf"))
        if share is None:       # any split among the keys: -log(their total weight)
            losses.append(torch.logsumexp(scores, 0) - torch.logsumexp(scores[keys.to(scores.device)], 0))
        else:                   # this split: the cross-entropy of the weights against the shares
            losses.append(torch.logsumexp(scores, 0) - scores[keys.to(scores.device)] @ share.to(scores))
    return torch.stack(losses).mean()


class Trainee(torch.nn.Module):
    """What one optimiser step runs: the model on a batch of chats (and the grounding heads on its hidden states,
    the pointing loss on its attention) and/or the ViT + cell heads on a batch of scenes. One module, so that
    DistributedDataParallel sees every parameter a step's losses reach."""

    def __init__(self, model, heads, ground=None):
        super().__init__()
        self.model, self.heads, self.ground = model, heads, ground

    def forward(self, chat: dict | None, scenes: tuple | None, marks=None):
        """-> (logits (B, L, V), cell logits, grounding logits, pointing loss); None for what was not asked.
        `marks`: point_targets of the chat (None: no pointing loss)."""
        seen, attention, hooks = {}, {}, []
        if chat is not None and self.ground is not None:   # the hidden states the grounding heads read, by hooks
            for after in sorted({g[2] for g in GROUNDS}):
                hooks.append(self.model.model.layers[after - 1].register_forward_hook(
                    lambda module, args, out, after=after: seen.update({after: out})))
        for i in sorted({m[0] for m in marks or ()}):       # the pointing layers' q, k and rotation, by hooks
            attn, got = self.model.model.layers[i].self_attn, {}
            hooks += [attn.q_proj.register_forward_hook(lambda module, args, out, got=got: got.update(q=out)),
                      attn.k_proj.register_forward_hook(lambda module, args, out, got=got: got.update(k=out)),
                      attn.register_forward_hook(lambda module, args, out, i=i, got=got: attention.update(
                          {i: (got["q"], got["k"], args[1], args[2], args[3])}))]     # args: x, cos, sin, mask
        try:
            logits = self.model(**chat) if chat is not None else None                # (B, L, V)
        finally:
            for hook in hooks:
                hook.remove()
        ground = self.ground(seen) if seen else None                # one (B, L, classes) table per head
        pointed = point_loss(attention, marks) if marks else None
        # scenes: (pixel rows (N, 1176), grids (n, 3)) -> one (N/4, classes) logit table per cell head
        cells = self.heads(self.model.visual(*scenes)) if scenes is not None else None
        return logits, cells, ground, pointed


def scene_batch(processor, rng, n, device):
    """n scenes and clips (three in ten are clips, and NUMBER_SHARE of the scenes have a written number) -> the
    ViT's inputs (pixel rows, grids) and the cell labels of each merged token (CELL_NAMES), then its glyph: which
    written digit of the batch it shows (-1: none), the groups of pool_digits."""
    items = [synthetic.draw_clip(rng) if rng.random() < 0.3 else
             synthetic.draw_scene(rng, number=rng.random() < NUMBER_SHARE) for _ in range(n)]
    rows, grids, labels = [], [], []
    for item in items:
        r, g, _ = processor.encode_media(synthetic.media_item(item))
        rows.append(r), grids.append(g), labels.append(cell_labels(item, processor, g[0].tolist()))
    targets = tuple(torch.cat(t).to(device) for t in zip(*labels))
    # which written digit each merged token shows, numbered across the batch (-1: none), for pool_digits
    picture = torch.cat([torch.full_like(t[0], i) for i, t in enumerate(labels)]).to(device)
    place = targets[CELL_NAMES.index("place")]
    glyph = torch.where(place > 0, picture * 4 + place, -1)
    return (torch.cat(rows).to(device), torch.cat(grids).to(device)), targets + (glyph,)


@torch.no_grad()
def cell_accuracy(model, heads, processor, rng, device, n=64) -> dict:
    """How well the ViT + heads name what lies under the merged tokens of n fresh scenes and clips: accuracy per
    head over the cells that hold something (background cells are easy and would hide the rest; the picture's
    count is under every cell, as scene_batch's pictures all hold 1-3 shapes)."""
    scenes, targets = scene_batch(processor, rng, n, device)
    _, cells, _, _ = Trainee(model, heads)(None, scenes)                    # one (N/4, classes) table per head
    out = {}
    digit = CELL_NAMES.index("digit")
    written = pool_digits(cells[digit], targets[digit], targets[-1])   # once per written digit: its tokens' mean
    for name, logits, labels in zip(CELL_NAMES + ("written digit",), cells + written[:1],
                                    targets[:len(CELL_NAMES)] + written[1:]):
        held = labels > 0
        if held.any():                                   # a small draw may hold no digit or no clip
            out[name] = round((logits.argmax(-1)[held] == labels[held]).float().mean().item(), 3)
    return out


def pool_digits(logits, digit, glyph):
    """The digit head's logits averaged over each written digit's merged tokens, which is the head applied to
    their mean feature (it is linear): (N/4, 11) logits, (N/4,) digit labels and glyphs (scene_batch) ->
    ((digits, 11) logits, (digits,) labels), one row per written digit."""
    held = glyph >= 0
    which, group = torch.unique(glyph[held], return_inverse=True)              # the batch's digits -> 0, 1, ...
    total = logits.new_zeros(len(which), logits.shape[1]).index_add_(0, group, logits[held])
    labels = digit.new_zeros(len(which)).scatter_reduce_(0, group, digit[held], "amax", include_self=False)
    return total / torch.bincount(group, minlength=len(which)).unsqueeze(1).to(total), labels


def cell_loss(cells, targets, pooled=0.0):
    """Cross-entropy of the heads, weighted by CELL_WEIGHTS: ((logits per head of CELL_NAMES), (their labels,
    glyph)); with `pooled`, the digit head once more per written digit, on the mean of its tokens (pool_digits)."""
    loss = sum(w * F.cross_entropy(logits, labels) for logits, labels, w in zip(cells, targets, CELL_WEIGHTS))
    if pooled:
        digit = CELL_NAMES.index("digit")
        logits, labels = pool_digits(cells[digit], targets[digit], targets[-1])
        if len(labels):
            loss = loss + pooled * F.cross_entropy(logits, labels)
    return loss


def ground_loss(ground, targets):
    """Weighted sum (GROUNDS) of the grounding heads' cross-entropies over the tokens that have a target: ((B, L,
    classes) logits per head, (B, L) labels per head). A head with no target in the batch adds nothing (its mean
    would be NaN)."""
    return sum((weight * F.cross_entropy(logits[labels != IGNORE], labels[labels != IGNORE])
                for logits, labels, (*_, weight) in zip(ground, targets, GROUNDS) if (labels != IGNORE).any()),
               ground[0].new_zeros(()))


# ---------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    lr: float
    train: tuple          # which top-level parts learn: "visual", "model" (the LLM; lm_head is tied to it)
    loss_on: str          # "text", "assistant" (see labels_for) or "cells" (no chats: the cell loss alone)
    weights: dict = field(default_factory=dict)   # category -> sampling weight
    cells: int = 0        # scenes or clips per step (all processes together) for the cell-label loss, 0 = none
    pooled: float = 0.0   # weight of the digit loss per written digit (cell_loss), beside the per-token one
    ground: bool = False  # the grounding heads' loss on object words and visual tokens (ground_labels)
    point: bool = False   # the pointing loss on the attention of the LLM's heads (point_targets)


TEXT_ONLY = {"text_only": 1.0, "text_document": 3.0}
# Stages 2 and 3 lean on multi-turn chats: 2-6 answers per image encoded, the cheapest supervision there is.
MIXED = {"caption": 1.0, "color": 0.5, "shape": 0.5, "count": 0.5, "count_kind": 0.5, "position": 0.5,
         "number": 1.0, "video_direction": 1.0, "video_color": 0.25, "two_image": 0.75, "multi_turn": 3.0,
         "text_only": 0.5}
# Stage 3 asks five times as many position questions as stage 2: where a shape is, is the answer that needs the
# most look-ups (ground_labels), and what its last step (from the answer's hidden state to the region's words) learns
# varied most between runs. Stage 3 from the same stage-2 weights, two data orders (before the shares of
# point_targets): position 73.5 / 53.5 % with MIXED, 85 / 78 % at weight 1.5, 87 / 84.5 % at 2.5 (colour 99 / 95.5,
# count 93 / 89.5 %); at 3.5 87 % with colour down to 92 % (one order). With the digit look-up (ANSWER_TO_DIGIT)
# colour, count and number questions are asked more, and stage 3 is longer (2,800 steps, from 2,000). From the same
# stage-2 weights and data order: colour 87.5 -> 96.5 % with colour at 1.5 and count at 1.0 (count 88 -> 91.5 %,
# numbers 78.5 -> 73 %, position 90 -> 89.5 %); then numbers at 1.5 and 2,800 steps: numbers 82 %, position 92 %.
INSTRUCT = MIXED | {"position": 2.5, "color": 1.5, "count": 1.0, "number": 1.5}
# The pooled digit loss (Stage.pooled) starts after the ViT warm-up. A glyph spans 6-16 merged tokens, each of
# which sees a stroke of it: asked per token the ViT names 35 % of them and the LLM, which reads them, answered
# 5.5 % of number questions. Asked once per written digit (the mean of its tokens) it names 90 % after the warm-up
# alone, but then the place (first, second, third digit) is never learned, even by a 6-layer ViT (52 %), and
# without it the LLM cannot tell which glyph to read next. Learned first, the place survives the pooled loss that
# follows (ViT warm-up alone, then 600 steps with both: place 87.5 %, digit 79 %; docs/experiments/number-reading.md).
STAGES = (
    Stage("0 text warm-up", 300, 2e-3, ("model",), "text", TEXT_ONLY),
    Stage("0 ViT warm-up, cell labels", 1200, 1e-3, ("visual",), "cells", cells=8),
    Stage("1 ViT + merger, LLM frozen", 500, 2e-3, ("visual",), "assistant", {"caption": 1.0}, cells=4,
          pooled=1.0),
    Stage("2 everything, mixed data", 2600, 1e-3, ("visual", "model"), "text", MIXED, cells=4, pooled=1.0),
    Stage("3 instruction tuning, ViT frozen", 2800, 1e-3, ("model",), "assistant", INSTRUCT, ground=True, point=True),
)


def lr_at(step, stage):
    """Linear warm-up over 5 % of the stage, then cosine decay to 10 % of the peak."""
    warm = max(1, stage.steps // 20)
    if step < warm:
        return stage.lr * (step + 1) / warm
    t = (step - warm) / max(1, stage.steps - warm)
    return stage.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train_stage(model, processor, stage, rng, batch_size, device, pos_mode, rank, world, show=True, heads=None,
                ground=None, stop=None):
    """One stage: freeze what it freezes, train, return the loss of every step. A stage with `cells` trains
    the cell heads too, one with `ground` the grounding heads: pass the same `heads` and `ground` to every stage
    to keep them (new ones are made otherwise). `stop`: end after that many steps, with the learning rates of the
    whole stage's schedule (the first steps of a run, exactly)."""
    for name, p in model.named_parameters():
        p.requires_grad = name.split(".")[0] in stage.train or (name.startswith("lm_head") and "model" in stage.train)
    params = [p for p in model.parameters() if p.requires_grad]
    if stage.cells:
        heads = heads if heads is not None else CellHeads(model.config.vision.hidden_size).to(device)
        params += list(heads.parameters())
    if stage.ground:
        ground = ground if ground is not None else GroundHeads(model.config.text.hidden_size).to(device)
        params += list(ground.parameters())
    trained = Trainee(model, heads if stage.cells else None, ground if stage.ground else None)
    net = DistributedDataParallel(trained, find_unused_parameters=True) if world > 1 else trained
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.01)
    losses, ground_losses, point_losses = [], [], []   # the total loss of every step; its grounding, pointing parts
    steps = stage.steps if stop is None else min(stop, stage.steps)
    bar = tqdm(range(steps), desc=f"stage {stage.name}", disable=not show or rank != 0, dynamic_ncols=True)
    data = batches(rng, stage.weights, batch_size) if stage.loss_on != "cells" else None
    for step in bar:
        chat = scenes = marks = None
        if data is not None:
            examples = next(data)
            batch, labels = make_batch(processor, examples, stage.loss_on)
            chat, labels = chat_inputs(batch.to(device), model.config, pos_mode), labels.to(device)
            cell_maps = scene_cells(examples, batch, processor) if stage.ground or stage.point else None
            if stage.ground:
                ground_marks = tuple(t.to(device) for t in ground_labels(examples, batch, processor, cell_maps))
            if stage.point:
                marks = point_targets(examples, batch, processor, cell_maps)
        if stage.cells:
            scenes, targets = scene_batch(processor, rng, max(1, stage.cells // world), device)
        logits, cells, grounded, pointed = net(chat, scenes, marks)
        loss = (token_loss(logits, labels) if chat else 0) + (cell_loss(cells, targets, stage.pooled) if scenes else 0)
        if grounded is not None:
            grounding = ground_loss(grounded, ground_marks)
            loss = loss + grounding
            ground_losses.append(grounding.item())
        if pointed is not None:
            loss = loss + pointed
            point_losses.append(pointed.item())
        for g in opt.param_groups:
            g["lr"] = lr_at(step, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                        **{name: f"{sum(part[-20:]) / len(part[-20:]):.3f}"
                           for name, part in (("grounding", ground_losses), ("pointing", point_losses)) if part})
    for p in model.parameters():
        p.requires_grad = True
    return losses


def plot_losses(log, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(log), figsize=(4 * len(log), 3), constrained_layout=True)
    for ax, (name, losses) in zip(axes, log.items()):
        smooth = [sum(losses[max(0, i - 19):i + 1]) / len(losses[max(0, i - 19):i + 1]) for i in range(len(losses))]
        ax.plot(losses, color="#56B4E9", alpha=0.4, lw=0.8, label="step")
        ax.plot(smooth, color="#0072B2", lw=1.5, label="mean of 20")
        ax.set(title=f"stage {name}", xlabel="step", ylabel="loss", yscale="log")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def snapshot_dir(out: Path) -> Path:
    """Where a run keeps its state after each finished stage: beside `out`, removed once the checkpoint is written."""
    return out.parent / f".{out.name}.stages"


def save_snapshot(out: Path, rank: int, index: int, recipe: str, model, heads, ground, rng, log, times):
    """After stage `index`: the weights, the cell and grounding heads and the data stream's random state (one file
    per process, each process draws its own examples), written to a temporary name and renamed, so a crash leaves
    either the old snapshot or the new one. Earlier snapshots of this process are removed: resuming needs only the
    last."""
    folder = snapshot_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{index}.rank{rank}.tmp"
    torch.save({"recipe": recipe, "model": model.state_dict(), "heads": heads.state_dict(),
                "ground": ground.state_dict() if ground is not None else None, "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "log": log, "times": times}, tmp)
    os.replace(tmp, folder / f"{index}.rank{rank}.pt")
    for older in range(index):
        (folder / f"{older}.rank{rank}.pt").unlink(missing_ok=True)


def restore_snapshot(out: Path, rank: int, recipe: str, n_stages: int, model, heads, ground, rng):
    """Load the last snapshot of a run with exactly this recipe into model, heads, ground and rng.
    -> (index of the first stage still to train, the losses and stage times so far); (0, {}, {}) if none."""
    for index in reversed(range(n_stages)):
        path = snapshot_dir(out) / f"{index}.rank{rank}.pt"
        if path.exists():
            snap = torch.load(path, map_location="cpu", weights_only=True)
            if snap["recipe"] != recipe:
                break
            model.load_state_dict(snap["model"])
            heads.load_state_dict(snap["heads"])
            if ground is not None:
                ground.load_state_dict(snap["ground"])
            version, state, gauss = snap["rng"]                 # saved as lists; random wants tuples back
            rng.setstate((version, tuple(state), gauss))
            torch.set_rng_state(snap["torch_rng"])
            return index + 1, snap["log"], snap["times"]
    return 0, {}, {}


def same_start(first: int, folder: Path):
    """Under torchrun, check that every process resumes at the same stage: one whose snapshot is missing or
    stale would start over while the others go on, and their DistributedDataParallel steps would then pair
    different stages (a hang, or silently mixed gradients). Raises on every process if they differ."""
    starts = [None] * dist.get_world_size()
    dist.all_gather_object(starts, first)
    if len(set(starts)) > 1:
        raise RuntimeError(f"--resume: the processes' snapshots in {folder} end after different stages (first "
                           f"stage to train, by rank: {starts}); every process needs its own snapshot of the same "
                           f"stage. Delete {folder} and start the run again without --resume.")


def start(seed=0, rope_theta=ROPE_THETA, mrope_section=MROPE_SECTION, rank=0, device="cpu"):
    """Where a run starts: the model with its seeded initial weights (and its tokenizer and processor), this
    process's stream of examples, and the cell heads (kept from stage to stage, never saved)."""
    torch.manual_seed(seed)                       # same initial weights on every rank
    tok = build_tokenizer(corpus(seed))
    config, processor = nano_config(tok, rope_theta, mrope_section), nano_processor(tok)
    model = init_weights(q.Qwen2VL(config)).to(device)
    rng = random.Random(seed * 1000 + rank + 1)   # each rank draws its own examples
    return model, processor, rng, CellHeads(config.vision.hidden_size).to(device)


def train(out=NANO_DIR, seed=0, scale=1.0, batch_size=8, pos_mode="mrope", evaluate_n=200, show=True,
          rope_theta=ROPE_THETA, mrope_section=MROPE_SECTION, stages=None, resume=False):
    """The whole recipe. Writes the checkpoint (and its training log) to `out` atomically; returns the log.
    The state after each stage is kept beside `out` (snapshot_dir) until the checkpoint is written: with
    `resume`, a run with the same settings starts after the last stage an interrupted run finished, and ends
    with the same weights as an uninterrupted run."""
    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    model, processor, rng, heads = start(seed, rope_theta, mrope_section, rank, device)
    stages = [dataclasses.replace(s, steps=max(1, round(s.steps * scale))) for s in stages or STAGES]
    # the same for the grounding heads, made only when a stage uses them (their initialisation draws from
    # torch's random state, which a recipe without them must not see)
    ground = GroundHeads(model.config.text.hidden_size).to(device) if any(s.ground for s in stages) else None
    recipe = json.dumps({"seed": seed, "batch_size": batch_size, "world_size": world, "positions": pos_mode,
                         "rope_theta": rope_theta, "mrope_section": list(mrope_section),
                         "stages": [dataclasses.asdict(s) for s in stages]}, sort_keys=True)
    first, log, times = (restore_snapshot(out, rank, recipe, len(stages), model, heads, ground, rng) if resume
                         else (0, {}, {}))
    if world > 1:
        same_start(first, snapshot_dir(out))
    if first == 0:                                # a fresh start: an older run's state must not be resumed later
        for stale in snapshot_dir(out).glob(f"*.rank{rank}.pt"):
            stale.unlink()
    if resume and rank == 0 and show:
        where = f"after stage {stages[first - 1].name!r}" if first else "at stage 0 (none finished with these settings)"
        print(f"resuming {where} ({snapshot_dir(out)})", flush=True)
    for index, stage in enumerate(stages[first:], first):
        t0 = time.time()
        log[stage.name] = train_stage(model, processor, stage, rng, batch_size // world, device, pos_mode, rank,
                                      world, show, heads, ground)
        times[stage.name] = time.time() - t0
        save_snapshot(out, rank, index, recipe, model, heads, ground, rng, log, times)
    summary = {"seed": seed, "scale": scale, "batch_size": batch_size, "positions": pos_mode, "world_size": world,
               "rope_theta": rope_theta, "mrope_section": list(mrope_section),
               "train_seconds": round(sum(times.values())), "stage_seconds": {k: round(v) for k, v in times.items()},
               "parameters": sum(p.numel() for p in model.parameters()), "device": str(device)}
    if rank == 0:
        model.eval()
        summary["cell_accuracy"] = cell_accuracy(model, heads, processor, random.Random(f"{seed}-cells"), device)
        answered = None
        if evaluate_n:
            from .evaluate import ask, scores
            answered = ask(model, processor, n=evaluate_n, positions=pos_mode, show=show)
            summary["evaluation"], summary["evaluation_n"] = scores(answered), evaluate_n
        write_checkpoint(model, processor, out, log, summary, answered)
        if evaluate_n:                            # is what the LLM misses in its visual tokens? (the card says)
            from . import probe
            probe.save(out, probe.measure(model, processor, n=max(100, 4 * evaluate_n)))
        from .card import write_card
        write_card(out)
    if world > 1:
        dist.barrier()                            # every rank has read its snapshots before they go
        dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(snapshot_dir(out), ignore_errors=True)
    return summary


def write_checkpoint(model, processor, out: Path, log, summary, answered=None):
    """The checkpoint plus training/ (loss curves, log, and the failure analysis of the evaluation's `answered`,
    see lab.evaluate.ask); staged in a sibling folder, then swapped in."""
    stage_dir = out.parent / f".{out.name}.new"
    shutil.rmtree(stage_dir, ignore_errors=True)
    q.save(model, processor, stage_dir)
    (stage_dir / "training").mkdir()
    (stage_dir / "training" / "log.json").write_text(json.dumps({"summary": summary, "losses": log}))
    plot_losses(log, stage_dir / "training" / "loss_curves.png")
    if answered:
        from .evaluate import save_failures
        save_failures(stage_dir, answered)
    if (out / "training" / "ablation.json").exists():   # the ablation is a separate, slower run: keep it
        shutil.copy(out / "training" / "ablation.json", stage_dir / "training" / "ablation.json")
    old = out.parent / f".{out.name}.old"
    if out.exists():
        os.replace(out, old)
    os.replace(stage_dir, out)
    shutil.rmtree(old, ignore_errors=True)


def ablation(out=NANO_DIR, seed=0, scale=0.4, n=200):
    """M-RoPE vs plain 1D positions, both retrained with the same shorter schedule; the result goes in the
    card of `out` (training/ablation.json). Whatever the outcome, it is reported as measured."""
    import tempfile
    result = {"seed": seed, "scale": scale, "n": n}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("mrope", "1d"):
            result[mode] = train(Path(tmp) / mode, seed, scale, pos_mode=mode, evaluate_n=n)["evaluation"]
            print(mode, json.dumps(result[mode]), flush=True)
    (Path(out) / "training" / "ablation.json").write_text(json.dumps(result, indent=1))
    from .card import write_card
    write_card(Path(out))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(NANO_DIR), help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.05 = smoke run)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch, split over the processes")
    p.add_argument("--positions", choices=["mrope", "1d"], default="mrope",
                   help="1d = the ablation: all three position rows equal the token index")
    p.add_argument("--rope-theta", type=float, default=ROPE_THETA, help="the LLM's RoPE base (Qwen2: 10000)")
    p.add_argument("--mrope-section", type=int, nargs=3, default=list(MROPE_SECTION), metavar=("T", "H", "W"),
                   help="rotary pairs for the t, h and w rows (sum = head_dim / 2 = 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / processes)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run after the last stage it finished (its state is kept in the "
                        "folder .NAME.stages beside --out); the other options must be the same as that run's")
    p.add_argument("--eval", type=int, default=200, help="held-out questions per category (0 = skip)")
    p.add_argument("--ablation", action="store_true",
                   help="instead: retrain M-RoPE and 1D-position models on a shorter schedule (--scale, default "
                        "0.4) and add the comparison to the card of --out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    if a.ablation:
        print(json.dumps(ablation(a.out, a.seed, a.scale if a.scale != 1.0 else 0.4, a.eval), indent=1))
        return
    s = train(a.out, a.seed, a.scale, a.batch_size, a.positions, a.eval, rope_theta=a.rope_theta,
              mrope_section=tuple(a.mrope_section), resume=a.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in s.items() if k != "evaluation"}, indent=1))
        if "evaluation" in s:
            print(json.dumps(s["evaluation"], indent=1))


if __name__ == "__main__":
    main()
