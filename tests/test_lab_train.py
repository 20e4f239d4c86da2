"""The nano recipe: tokenizer, labels, a short training run that lowers the loss, and the 2-process
torchrun run (DistributedDataParallel over gloo)."""
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen2vl_min as q
from lab import synthetic, train


@pytest.fixture(scope="module")
def tok():
    return train.build_tokenizer(train.corpus(seed=0, n=300))


@pytest.mark.parametrize("text", ["What color is the circle?", "Grüße aus Köln! 你好，世界 🙂🚀",
                                  "tabs\tand\nnewlines\r\n", "<not a special token>", "∑ x² ≥ 0 — ok?",
                                  "\u0000\u00ff\U0010ffff"])
def test_tokenizer_round_trips_any_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_has_the_qwen_special_tokens_as_single_tokens(tok):
    for special in train.SPECIAL_TOKENS:
        assert tok.encode(special, add_special_tokens=False).ids == [tok.token_to_id(special)]
    assert tok.encode("What color is the circle?", add_special_tokens=False).ids.__len__() <= 8  # BPE learned words


def test_labels_cover_answers_and_im_end_only(tok):
    processor = train.nano_processor(tok)
    rng = random.Random(1)
    examples = [synthetic.make_example(rng, "multi_turn"), synthetic.make_example(rng, "text_only")]
    batch, labels = train.make_batch(processor, examples, "assistant")
    im_end = processor.eos_token_ids[0]
    for b, ex in enumerate(examples):
        kept = labels[b][labels[b] != train.IGNORE].tolist()
        answers = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        expected = []
        for a in answers:
            expected += tok.encode(a, add_special_tokens=False).ids + [im_end]
        assert kept == expected
    _, text_labels = train.make_batch(processor, examples, "text")
    assert (text_labels != train.IGNORE).sum() > (labels != train.IGNORE).sum()
    assert not (text_labels == processor.image_token_id).any()         # placeholders are inputs, not targets
    assert (text_labels[batch.attention_mask == 0] == train.IGNORE).all()  # nor is the padding


def test_nano_config_is_a_genuine_small_qwen2vl(tok):
    cfg = train.nano_config(tok)
    assert q.Qwen2VLConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.text.head_dim == 32 and cfg.text.mrope_section == (4, 6, 6)
    assert cfg.text.vocab_size >= tok.get_vocab_size()
    processor = train.nano_processor(tok)
    big = processor([{"role": "user", "content": [{"type": "image", "image": synthetic.draw_scene(
        random.Random(0), size=(336, 336)).image}, {"type": "text", "text": "Describe the image."}]}])
    assert big.media[0]["tokens"] <= train.TOKENS_PER_IMAGE


def test_a_short_run_lowers_the_loss(tok):
    torch.manual_seed(0)
    processor = train.nano_processor(tok)
    model = train.init_weights(q.Qwen2VL(train.nano_config(tok)))
    stage = train.Stage("smoke", 40, 2e-3, ("visual", "model"), "assistant", synthetic.DEFAULT_WEIGHTS)
    losses = train.train_stage(model, processor, stage, random.Random(0), 8, torch.device("cpu"), "mrope", 0, 1,
                               show=False)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_stage_freezing_trains_only_its_parts(tok):
    torch.manual_seed(0)
    processor = train.nano_processor(tok)
    model = train.init_weights(q.Qwen2VL(train.nano_config(tok)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = train.Stage("frozen LLM", 2, 1e-3, ("visual",), "assistant", {"caption": 1.0})
    train.train_stage(model, processor, stage, random.Random(0), 4, torch.device("cpu"), "mrope", 0, 1, show=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert any(k.startswith("visual.blocks.") for k in changed) and any(k.startswith("visual.merger.") for k in changed)


def _scene(*shapes):
    """A 112 x 112 scene holding these (kind, colour, region) shapes, each a 30 px box in the middle of its region;
    ground_labels reads only the shapes (and their boxes, for the visual tokens' labels), not the picture."""
    from PIL import Image
    corner = lambda region: [round((i + 0.5) * 112 / 3) - 15 for i in divmod(synthetic.REGIONS.index(region), 3)]
    return synthetic.Scene(Image.new("RGB", (112, 112), "white"), tuple(
        synthetic.Shape(k, c, r, (x, y, x + 30, y + 30)) for k, c, r in shapes for y, x in [corner(r)]), None)


def test_nano_tokenizer_keeps_every_grounded_word_whole():
    words = train.ground_words(q.load(train.NANO_DIR, device="cpu")[1].tokenizer)
    assert len(words) == 2 * len(synthetic.SHAPES) + len(synthetic.COLORS) + 2      # kinds, plurals, colours, 2


def test_ground_labels_name_the_one_object_a_word_names(tok):
    processor = train.nano_processor(tok)
    scene = _scene(("circle", "red", "top left"), ("square", "blue", "center"), ("square", "green", "right"))
    questions = ["What color is the circle?", "What shape is the blue object?", "Where is the green square?",
                 "How many squares are there?", "How many shapes are there?", "What color is the square?",
                 "How many triangles are there?"]
    examples = [{"messages": [{"role": "user", "content": [synthetic.media_item(scene), {"type": "text", "text": t}]}],
                 "world": (scene,)} for t in questions]
    examples.append({"messages": [{"role": "user", "content": "What color is the circle?"}], "world": ()})
    batch = processor.batch([ex["messages"] for ex in examples], add_generation_prompt=True)
    tables = dict(zip(train.GROUND_NAMES, train.ground_labels(examples, batch, processor)))

    def named(what, b):         # word -> target, over the tokens of row b that have one
        table = tables[what][b]
        return {tok.decode([int(batch.input_ids[b, i])]).strip(): int(table[i])
                for i in (table != train.IGNORE).nonzero().flatten()}

    colours, kinds = list(synthetic.COLORS), synthetic.SHAPES
    assert named("colour", 0) == {"circle": colours.index("red")} and named("kind", 0) == {}
    assert named("kind", 1) == {"blue": kinds.index("square")} and named("colour", 1) == {}
    assert named("kind", 2) == {"green": kinds.index("square")}
    assert named("colour", 2) == {}                  # "green square": the colour is the word before, no look-up
    assert named("colour before", 2) == {"square": colours.index("green")}         # ... carried over instead
    assert all(named("colour before", b) == {} for b in (0, 1, 3, 4, 5, 6, 7))
    assert named("count", 3) == {"squares": 2} and named("count", 4) == {"shapes": 3}
    assert named("count", 6) == {"triangles": 0}
    assert named("colour", 5) == {}                                   # two squares: "the square" names none
    regions = synthetic.REGIONS.index
    assert named("region", 0) == {"circle": regions("top left")} and named("region", 1) == {"blue": regions("center")}
    assert named("region", 2) == {"green": regions("right"), "square": regions("right")}   # "green square": that one
    assert all(named("region", b) == {} for b in (3, 4, 5, 6))        # plurals name no one place; two squares
    assert all(named(what, 7) == {} for what in train.GROUND_NAMES)  # no picture, nothing to ground
    for b in range(7):                    # where a region is asked, also the centre in twelfths: inside that region
        centre = [named("centre row", b), named("centre column", b)]
        assert centre[0].keys() == centre[1].keys() == named("region", b).keys()
        assert all(divmod(r, 3) == (centre[0][w] // 4, centre[1][w] // 4) for w, r in named("region", b).items())


def test_ground_labels_ask_the_answer_for_the_colour_or_kind_it_says(tok):
    """Where an answer's colour word is predicted, in a chat about one scene: that colour, whichever turn it is in;
    where its shape word is, that kind; not where an answer says a count or a caption (whose first word is
    neither), nor in a chat about a clip."""
    processor = train.nano_processor(tok)
    scene = _scene(("circle", "red", "top left"), ("square", "blue", "center"))
    clip = synthetic.draw_clip(random.Random(3))
    turns = [("What shape is the blue object?", "square."), ("What color is the circle?", "red."),
             ("How many shapes are there?", "2."), ("Describe the image.", synthetic.describe(scene)),
             ("What color is the square?", "blue.")]
    examples = [{"messages": [], "world": (scene,)},
                {"messages": [{"role": "user", "content": [synthetic.media_item(clip), {"type": "text",
                              "text": "What color is the moving shape?"}]},
                              {"role": "assistant", "content": f"{clip.moving.color}."}], "world": (clip,)}]
    for i, (question, answer) in enumerate(turns):
        examples[0]["messages"] += [{"role": "user", "content": ([synthetic.media_item(scene)] if i == 0 else []) +
                                     [{"type": "text", "text": question}]}, {"role": "assistant", "content": answer}]
    batch, labels = train.make_batch(processor, examples, "assistant")
    tables = dict(zip(train.GROUND_NAMES, train.ground_labels(examples, batch, processor)))
    colours = list(synthetic.COLORS)
    for name, want in (("answer colour", [("red", colours.index("red")), ("blue", colours.index("blue"))]),
                       ("answer kind", [("square", synthetic.SHAPES.index("square"))])):
        table = tables[name]
        marked = (table[0] != train.IGNORE).nonzero()[:, 0]
        assert [(tok.decode([int(batch.input_ids[0, i + 1])]), int(table[0, i])) for i in marked] == want
        assert all(labels[0, i] == train.IGNORE != labels[0, i + 1] for i in marked)   # the answer's first token next
        assert (table[1] == train.IGNORE).all()


def test_ground_labels_ask_a_count_questions_answer_for_the_count(tok):
    """Where the answer to "How many ...?" is predicted: the count of the question's plural (0 when the picture has
    none of that kind), in any turn; not where other answers are predicted, nor in a chat with two pictures."""
    processor = train.nano_processor(tok)
    scene = _scene(("circle", "red", "top left"), ("circle", "blue", "center"), ("square", "green", "right"))
    turns = [("How many shapes are there?", "3."), ("What color is the square?", "green."),
             ("How many circles are there?", "2."), ("Count the triangles.", "0."), ("Describe the image.",
             synthetic.describe(scene))]
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages += [{"role": "user", "content": ([synthetic.media_item(scene)] if i == 0 else []) +
                      [{"type": "text", "text": question}]}, {"role": "assistant", "content": answer}]
    two = [{"role": "user", "content": [synthetic.media_item(scene), synthetic.media_item(scene),
                                        {"type": "text", "text": "Which image has more shapes?"}]},
           {"role": "assistant", "content": "the first image."}]
    examples = [{"messages": messages, "world": (scene,)}, {"messages": two, "world": (scene, scene)}]
    batch, labels = train.make_batch(processor, examples, "assistant")
    tables = dict(zip(train.GROUND_NAMES, train.ground_labels(examples, batch, processor)))
    table, plural = tables["answer count"], tables["count"]
    marked = (table[0] != train.IGNORE).nonzero()[:, 0]
    assert [(tok.decode([int(batch.input_ids[0, i + 1])]), int(table[0, i])) for i in marked] == \
        [("3", 3), ("2", 2), ("0", 0)]
    assert [int(plural[0, i]) for i in (plural[0] != train.IGNORE).nonzero()[:, 0]] == [3, 2, 0]
    assert all(labels[0, i] == train.IGNORE != labels[0, i + 1] for i in marked)    # the answer's first token next
    assert (table[1] == train.IGNORE).all()


def _chat(media, turns):
    """User / assistant messages: the media in the first user turn, then (question, answer) pairs."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages += [{"role": "user", "content": (media if i == 0 else []) + [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": answer}]
    return messages


def _number_scene(digits=3, seed=0):
    rng = random.Random(seed)
    while True:
        scene = synthetic.draw_number_scene(rng)
        if len(scene.digits) == digits:
            return scene


def test_ground_labels_ask_where_each_digit_of_the_number_is_said_which_and_what_it_is(tok):
    """Where a digit of the written number is predicted, in the answer to "What number is written?" and at the
    end of a caption: which digit of the number comes (0, 1, 2) and that digit; not in a count whose answer is
    the same digits, nor in a scene without a number. Every visual token of the scene: its digit's place
    (oracle: the cell labels, the ViT warm-up's dense labels)."""
    processor = train.nano_processor(tok)
    number = _number_scene()
    said = f"{number.number}."
    examples = [{"messages": _chat([synthetic.media_item(number)], [
                    ("What number is written?", said), ("How many shapes are there?", said),
                    ("Describe the image.", synthetic.describe(number))]), "world": (number,)},
                {"messages": _chat([synthetic.media_item(_scene(("circle", "red", "top")))], [
                    ("What color is the circle?", "red.")]), "world": (_scene(("circle", "red", "top")),)}]
    assert synthetic.describe(number).endswith(f" number {number.number}.")
    batch, labels = train.make_batch(processor, examples, "assistant")
    tables = dict(zip(train.GROUND_NAMES, train.ground_labels(examples, batch, processor)))
    ids = batch.input_ids

    def said_at(what, b):       # (next token, target) at the positions of row b that have one
        table = tables[what][b]
        return [(tok.decode([int(ids[b, i + 1])]), int(table[i])) for i in (table != train.IGNORE).nonzero()[:, 0]]

    digits = str(number.number)
    assert said_at("answer digit", 0) == [(d, int(d)) for d in digits] * 2      # the answer, the caption's end
    assert said_at("answer place", 0) == [(d, k) for k, d in enumerate(digits)] * 2
    assert said_at("answer digit", 1) == said_at("answer place", 1) == []
    assert all(labels[0, i + 1] != train.IGNORE for i in (tables["answer digit"][0] != train.IGNORE).nonzero()[:, 0])
    place = train.cell_labels(number, processor)[train.CELL_NAMES.index("place")]
    image = ids[0] == processor.image_token_id
    assert torch.equal(tables["token place"][0][image], place) and set(place.tolist()) == {0, 1, 2, 3}
    assert (tables["token place"][0][~image] == train.IGNORE).all()
    assert (tables["token place"][1][ids[1] == processor.image_token_id] == 0).all()


def test_point_targets_point_each_digit_of_the_answer_at_its_written_digit(tok):
    """At the position that predicts the k-th digit of "742.", ANSWER_TO_DIGIT looks evenly at the visual tokens
    whose 28 x 28 squares (mapped back onto the picture) overlap the k-th digit's ink box, at no token of another
    digit, and DIGIT_BEFORE at the token before (the answer's opening, then the digits said so far)."""
    processor = train.nano_processor(tok)
    number = _number_scene(seed=3)
    examples = [{"messages": _chat([synthetic.media_item(number)], [("What number is written?", f"{number.number}."),
                                                                    ("How many shapes are there?", "1.")]),
                 "world": (number,)}]
    batch, _ = train.make_batch(processor, examples, "assistant")
    marks = train.point_targets(examples, batch, processor)
    read = [m for m in marks if m[:2] == train.ANSWER_TO_DIGIT]
    before = [m for m in marks if m[:2] == train.DIGIT_BEFORE]
    ids = batch.input_ids[0]
    assert [tok.decode([int(ids[i + 1])]) for _, _, _, i, _, _ in read] == list(str(number.number))
    assert [(i, keys.tolist(), share) for _, _, _, i, keys, share in before] == [(i, [i - 1], None)
                                                                                  for *_, i, _, _ in read]
    assert tok.decode([int(ids[before[0][4]])]) == "assistant"
    _, h, w = batch.image_grid_thw[0].tolist()
    start, cols = ids.tolist().index(processor.image_token_id), w // 2
    sx, sy = number.image.width / (w * 14), number.image.height / (h * 14)   # resized pixels -> the picture's

    def square(cell):           # a merged token's 28 x 28 pixels, in the picture's coordinates
        r, c = divmod(cell - start, cols)
        return 28 * c * sx, 28 * r * sy, 28 * (c + 1) * sx, 28 * (r + 1) * sy

    def overlaps(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for (*_, keys, share), (_, box) in zip(read, number.digits):
        assert len(keys) > 0 and all(overlaps(square(k), box) for k in keys.tolist())
        assert torch.allclose(share, torch.full((len(keys),), 1 / len(keys)))
    assert sum(len(m[4]) for m in read) == len(set().union(*(set(m[4].tolist()) for m in read)))   # disjoint


def test_cell_labels_count_the_shapes_of_the_picture(tok):
    """Under every merged token: how many shapes its scene or clip holds; under a shape: how many of its kind."""
    processor, rng = train.nano_processor(tok), random.Random(4)
    items = [synthetic.draw_scene(rng, n_shapes=n) for n in (1, 2, 3, 3, 3)] + \
        [synthetic.draw_number_scene(rng) for _ in range(4)] + [synthetic.draw_clip(rng) for _ in range(4)]
    for item in items:
        kind, *_, count, of_kind = train.cell_labels(item, processor)
        shapes = item.shapes if isinstance(item, synthetic.Scene) else [item.moving] + [item.static] * bool(item.static)
        assert count.tolist() == [len(shapes)] * len(kind)
        assert of_kind.tolist() == [sum(s.kind == synthetic.SHAPES[k - 1] for s in shapes) if k else 0
                                    for k in kind.tolist()]
    assert any(len(item.shapes) == 0 for item in items[5:9])            # a number alone: count 0
    assert any(len({s.kind for s in item.shapes}) < len(item.shapes) for item in items[:5])   # two of one kind


def test_ground_labels_give_each_visual_token_the_row_and_column_m_rope_gives_it(tok):
    """Oracle: the M-RoPE ids the model itself uses. An image token's (t, h, w) ids are (s, s + row, s + column)
    for the image's start id s, so its row and column targets must be h - t and w - t: in a row with two images
    of different shapes, in a left-padded row, and with no labels on text or video tokens."""
    from qwen2vl_min.rope import mrope_position_ids
    processor = train.nano_processor(tok)
    rng = random.Random(4)
    wide, tall = synthetic.draw_scene(rng, size=(336, 112)), synthetic.draw_scene(rng, size=(140, 280))
    clip = synthetic.draw_clip(rng)
    text = lambda t: {"type": "text", "text": t}
    examples = [{"messages": [{"role": "user", "content": [synthetic.media_item(wide), synthetic.media_item(tall),
                                                          text("Which image has more shapes?")]}], "world": (wide, tall)},
                {"messages": [{"role": "user", "content": [synthetic.media_item(clip), synthetic.media_item(tall),
                                                          text("Hi")]}], "world": (clip, tall)},
                {"messages": [{"role": "user", "content": [text("Hello")]}], "world": ()}]
    batch = processor.batch([ex["messages"] for ex in examples], add_generation_prompt=True)
    tables = dict(zip(train.GROUND_NAMES, train.ground_labels(examples, batch, processor)))
    config = train.nano_config(tok)
    ids, _ = mrope_position_ids(batch.input_ids, batch.image_grid_thw, batch.video_grid_thw, batch.attention_mask,
                                config)                                                          # (3, B, L)
    image = batch.input_ids == processor.image_token_id
    assert image.sum() > 0 and image[1].sum() > 0 and (batch.attention_mask[2] == 0).any()
    assert torch.equal(tables["row"][image], (ids[1] - ids[0])[image])
    assert torch.equal(tables["column"][image], (ids[2] - ids[0])[image])
    assert (tables["row"][~image] == train.IGNORE).all() and (tables["column"][~image] == train.IGNORE).all()
    assert tables["column"][0].max() == 336 // 28 - 1 and tables["row"][0][image[0]].max() == 280 // 28 - 1


def test_ground_labels_give_each_visual_token_of_a_scene_its_kind_and_colour(tok):
    """Oracle: the cell labels (the ViT warm-up's dense labels) of the scene, on its visual tokens, and nothing on
    the text; no such labels in a chat about two pictures or a clip (nothing asks there which object is which)."""
    processor, rng = train.nano_processor(tok), random.Random(5)
    scene, other, clip = synthetic.draw_scene(rng, n_shapes=3), synthetic.draw_scene(rng), synthetic.draw_clip(rng)
    text = lambda t: {"type": "text", "text": t}
    examples = [{"messages": [{"role": "user", "content": [synthetic.media_item(scene), text("Hi")]}],
                 "world": (scene,)},
                {"messages": [{"role": "user", "content": [synthetic.media_item(scene), synthetic.media_item(other),
                                                          text("Which image has more shapes?")]}],
                 "world": (scene, other)},
                {"messages": [{"role": "user", "content": [synthetic.media_item(clip), text("Hi")]}],
                 "world": (clip,)}]
    batch = processor.batch([ex["messages"] for ex in examples], add_generation_prompt=True)
    tables = dict(zip(train.GROUND_NAMES, train.ground_labels(examples, batch, processor)))
    kind, colour, *_ = train.cell_labels(scene, processor)
    image = batch.input_ids[0] == processor.image_token_id
    assert torch.equal(tables["token kind"][0][image], kind) and torch.equal(tables["token colour"][0][image], colour)
    assert (kind > 0).any() and (kind == 0).any() and (colour > 0).sum() == (kind > 0).sum()
    assert (tables["token kind"][0][~image] == train.IGNORE).all()
    assert all((tables[name][1:] == train.IGNORE).all() for name in ("token kind", "token colour"))


def test_ground_labels_ask_both_words_of_a_region_answer_for_the_region(tok):
    """Where the words of a position answer are predicted ("top left.": "top" and " left", not "."), the region;
    "right." has one word; no target where other answers are predicted."""
    processor = train.nano_processor(tok)
    scene = _scene(("circle", "red", "top left"), ("square", "blue", "right"))
    turns = [("Where is the red circle?", "top left."), ("What color is the circle?", "red."),
             ("Where is the blue square?", "right.")]
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages += [{"role": "user", "content": ([synthetic.media_item(scene)] if i == 0 else []) +
                      [{"type": "text", "text": question}]}, {"role": "assistant", "content": answer}]
    batch, labels = train.make_batch(processor, [{"messages": messages, "world": (scene,)}], "assistant")
    table = dict(zip(train.GROUND_NAMES, train.ground_labels([{"messages": messages, "world": (scene,)}], batch,
                                                              processor)))["answer region"][0]
    marked = (table != train.IGNORE).nonzero()[:, 0]
    regions = synthetic.REGIONS.index
    assert [(tok.decode([int(batch.input_ids[0, i + 1])]), int(table[i])) for i in marked] == \
        [("top", regions("top left")), (" left", regions("top left")), ("right", regions("right"))]
    assert all(labels[0, i + 1] != train.IGNORE for i in marked)         # each predicts a word of the answer


def test_grounding_heads_read_the_llm_after_their_layers(tok):
    """Each grounding head's loss reaches the LLM's layers below the point GROUNDS says it reads, and nothing
    above them: the hooks read the right layers' outputs."""
    torch.manual_seed(0)
    processor = train.nano_processor(tok)
    model = train.init_weights(q.Qwen2VL(train.nano_config(tok)))
    examples = [synthetic.make_example(random.Random(i), ("color", "position")[i % 2]) for i in range(6)]
    batch, _ = train.make_batch(processor, examples, "assistant")
    ground = train.GroundHeads(model.config.text.hidden_size)
    targets = train.ground_labels(examples, batch, processor)
    for head, (name, _, after, _) in enumerate(train.GROUNDS):
        if (targets[head] == train.IGNORE).all():
            continue
        model.zero_grad(set_to_none=True)
        _, _, grounded, _ = train.Trainee(model, None, ground)(train.chat_inputs(batch, model.config), None)
        assert all(g.shape[:2] == batch.input_ids.shape for g in grounded)
        only = tuple(t if k == head else torch.full_like(t, train.IGNORE) for k, t in enumerate(targets))
        train.ground_loss(grounded, only).backward()
        reached = {i for i, layer in enumerate(model.model.layers) if any(p.grad is not None for p in layer.parameters())}
        assert reached == set(range(after)), name
        assert ground.heads[head].weight.grad is not None
    tested = {name for (name, *_), t in zip(train.GROUNDS, targets) if (t != train.IGNORE).any()}
    assert {"colour", "region", "row", "token kind", "answer region"} <= tested
    assert {g[2] for g in train.GROUNDS} == {1, 2, 3}
    assert not any(layer._forward_hooks for layer in model.model.layers)    # the hooks are gone afterwards


def _three_kinds_scene(seed=0):
    """A drawn scene with a circle, a square and a triangle (so each kind names one object)."""
    rng = random.Random(seed)
    while True:
        scene = synthetic.draw_scene(rng, n_shapes=3)
        if sorted(s.kind for s in scene.shapes) == sorted(synthetic.SHAPES):
            return scene


def test_point_targets_mark_the_named_object_and_the_question_word():
    """Layer 0: at "circle" (also in "red circle") the circle's visual tokens (from the cell labels; one circle here,
    two in the next test), at "shapes" every shape's; layer 1: at the position that predicts each answer, the
    question's last object word; nothing in the last answer, in a chat about a clip or without a picture."""
    model, processor = q.load(train.NANO_DIR, device="cpu")
    scene = _three_kinds_scene()
    circle = next(s for s in scene.shapes if s.kind == "circle")
    turns = [("What color is the circle?", f"{circle.color}."), (f"Where is the {circle.color} circle?", "top."),
             ("How many shapes are there?", "3."), ("Describe the image.", synthetic.describe(scene))]
    messages = []
    for i, (question, answer) in enumerate(turns):
        media = [synthetic.media_item(scene)] if i == 0 else []
        messages += [{"role": "user", "content": media + [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": answer}]
    clip = synthetic.draw_clip(random.Random(1))
    examples = [{"messages": messages, "world": (scene,)},
                {"messages": [{"role": "user", "content": [synthetic.media_item(clip), {"type": "text",
                              "text": "What color is the moving shape?"}]}, {"role": "assistant", "content": "red."}],
                 "world": (clip,)},
                {"messages": [{"role": "user", "content": "What color is the circle?"},
                              {"role": "assistant", "content": "red."}], "world": ()}]
    batch, labels = train.make_batch(processor, examples, "assistant")
    marks = train.point_targets(examples, batch, processor)
    assert {m[2] for m in marks} == {0}
    ids, word = batch.input_ids[0], lambda i: processor.tokenizer.decode([int(batch.input_ids[0, i])]).strip()
    start = ids.tolist().index(processor.image_token_id)
    kind, colour, *_ = train.cell_labels(scene, processor, batch.image_grid_thw[0].tolist())
    circle_cells = set((start + (kind == 1 + synthetic.SHAPES.index("circle")).nonzero()[:, 0]).tolist())
    last_image_token = start + len(kind) - 1
    assert ids[last_image_token] == processor.image_token_id != ids[last_image_token + 1]

    def hop(which, keys=lambda k: set(k.tolist())):
        return [(i, keys(k)) for layer, head, _, i, k, _ in marks if (layer, head) == which]
    words = lambda k: [word(j) for j in k.tolist()]
    objects = hop(train.WORD_TO_OBJECT)
    assert [(word(i), k) for i, k in objects] == [
        ("circle", circle_cells), (circle.color, set((start + (colour == 1 + list(
            synthetic.COLORS).index(circle.color)).nonzero()[:, 0]).tolist())), ("circle", circle_cells),
        ("shapes", set((start + (kind > 0).nonzero()[:, 0]).tolist()))]
    assert circle_cells < objects[-1][1]
    answers = [i for i in range(1, ids.shape[0]) if labels[0, i] != train.IGNORE and labels[0, i - 1] == train.IGNORE]
    hops = [(answers[0] - 1, ["circle"]), (answers[1] - 1, ["circle"]), (answers[2] - 1, ["shapes"])]
    assert hop(train.ANSWER_TO_WORD, words) == hop(train.ANSWER_TO_PLACE, words) == hops
    # where the words' objects are: in layer 1 the same words look at the tokens the objects cover (a few more: any
    # share of a token counts), and at the image's last one
    assert [i for i, _ in hop(train.WORD_TO_PLACE)] == [i for i, _ in objects]
    assert all(cells <= keys for (_, cells), (_, keys) in zip(objects, hop(train.WORD_TO_PLACE)))
    assert hop(train.WORD_TO_CORNER) == [(i, {last_image_token}) for i, _ in objects]
    assert all(i < answers[-1] for _, _, _, i, _, _ in marks)          # the caption's words are not marked
    assert all((share is None) == ((layer, head) != train.WORD_TO_PLACE) for layer, head, *_, share in marks)
    assert {m[:2] for m in marks} == {train.WORD_TO_OBJECT, train.WORD_TO_PLACE, train.WORD_TO_CORNER,
                                      train.ANSWER_TO_WORD, train.ANSWER_TO_PLACE}


def test_point_targets_find_the_red_circle_by_both_words_in_layer_1():
    """With two circles, "circle" in "Where is the red circle?" looks in layer 0 at both (its query knows only its
    own word there) and in layer 1 at the red one alone (by then it knows the word before); every word of the
    answer ("top", " left") looks at the question's word."""
    from PIL import Image
    processor = q.load(train.NANO_DIR, device="cpu")[1]
    shapes = (synthetic.Shape("circle", "red", "top left", (10, 10, 70, 70)),
              synthetic.Shape("circle", "blue", "bottom right", (150, 150, 210, 210)),
              synthetic.Shape("square", "red", "top right", (150, 10, 210, 70)))
    scene = synthetic.Scene(Image.new("RGB", (224, 224), "white"), shapes, None)
    messages = [{"role": "user", "content": [synthetic.media_item(scene), {"type": "text",
                                                                          "text": "Where is the red circle?"}]},
                {"role": "assistant", "content": "top left."}, {"role": "user", "content": "Describe the image."},
                {"role": "assistant", "content": synthetic.describe(scene)}]
    examples = [{"messages": messages, "world": (scene,)}]
    batch, _ = train.make_batch(processor, examples, "assistant")
    marks = train.point_targets(examples, batch, processor)
    ids = batch.input_ids[0]
    word = lambda i: processor.tokenizer.decode([int(ids[i])])
    start = ids.tolist().index(processor.image_token_id)
    kind, colour, *_ = train.cell_labels(scene, processor, batch.image_grid_thw[0].tolist())
    cells = lambda where: set((start + where.nonzero()[:, 0]).tolist())
    circles = cells(kind == 1 + synthetic.SHAPES.index("circle"))
    red = cells(colour == 1 + list(synthetic.COLORS).index("red"))
    hop = lambda which: {word(i).strip(): (k, s) for layer, head, _, i, k, s in marks if (layer, head) == which}
    assert {w: set(k.tolist()) for w, (k, _) in hop(train.WORD_TO_OBJECT).items()} == {"red": red, "circle": circles}
    assert circles & red < circles
    keys, share = hop(train.WORD_TO_PLACE)["circle"]     # layer 1: the red circle only (shares: the next test)
    assert circles & red <= set(keys.tolist()) and not set(keys.tolist()) & (circles - red)
    predicts = [(word(i + 1), word(int(k))) for layer, head, _, i, k, _ in marks
                if (layer, head) == train.ANSWER_TO_WORD]
    assert predicts == [("top", " circle"), (" left", " circle")]


def test_word_to_place_shares_average_to_the_shapes_centre():
    """In layer 1 "circle" of "Where is the red circle?" looks at every token the circle covers, each by the share
    of it the circle covers: the shares add up to 1, and the tokens' centres averaged by them land on the shape's
    centre (to a tenth of a token, over 24 drawn circles and squares), where an even split over the same tokens
    misses it by over a third of a token now and then (a region is a third of the grid: 1.3 tokens on a small
    picture)."""
    processor = q.load(train.NANO_DIR, device="cpu")[1]
    rng = random.Random(3)
    scenes = [scene for scene in (synthetic.draw_scene(rng, n_shapes=1) for _ in range(40))
              if scene.shapes[0].kind != "triangle"][:24]              # a triangle's centroid is below its box's centre
    examples = [{"messages": [{"role": "user", "content": [synthetic.media_item(scene), {"type": "text", "text":
                 f"Where is the {scene.shapes[0].color} {scene.shapes[0].kind}?"}]},
                              {"role": "assistant", "content": f"{scene.shapes[0].region}."}], "world": (scene,)}
                for scene in scenes]
    batch, _ = train.make_batch(processor, examples, "assistant")
    marks = [m for m in train.point_targets(examples, batch, processor) if m[:2] == train.WORD_TO_PLACE]
    misses, even = [], []
    for scene, (start, h, w), (*_, b, i, keys, share) in zip(scenes, (s[0] for s in train.image_spans(
            examples, batch, processor)), marks[1::2]):                    # each row's second mark: at its kind word
        assert processor.tokenizer.decode([int(batch.input_ids[b, i])]).strip() == scene.shapes[0].kind
        assert torch.isclose(share.sum(), torch.tensor(1.0)) and (share > 0).all()
        (x0, y0, x1, y1), (cw, ch) = scene.shapes[0].box, scene.image.size
        centre = torch.tensor([(y0 + y1) / 2 * h / ch, (x0 + x1) / 2 * w / cw])   # in merged tokens
        cells = torch.stack([(keys - start) // w, (keys - start) % w], 1) + 0.5   # (n, 2): the tokens' centres
        misses.append((share @ cells - centre).abs().max())
        even.append((cells.mean(0) - centre).abs().max())
    assert len(misses) == len(scenes) and max(misses) < 0.1
    assert max(even) > 0.3


def test_point_loss_is_the_attention_the_model_computed():
    """exp(-pointing loss) of one mark equals the weight that head gave those keys in the model's own forward pass,
    as lab.trace records it from a generation (its query and KV-cache keys); with shares, the loss is their
    cross-entropy with those weights."""
    from lab.trace import record_attention
    model, processor = q.load(train.NANO_DIR, device="cpu")
    scene = _three_kinds_scene(1)
    examples = [{"messages": [{"role": "user", "content": [synthetic.media_item(scene),
                                                           {"type": "text", "text": "What color is the square?"}]}],
                 "world": (scene,)}]
    batch = processor.batch([ex["messages"] for ex in examples], add_generation_prompt=True)
    marks = train.point_targets(examples, batch, processor)
    hop = [m for m in marks if m[:2] == train.ANSWER_TO_WORD]
    assert len(hop) == 1 and hop[0][3] == batch.input_ids.shape[1] - 1     # the generation prompt's last token
    # the trained hop puts almost all its weight on the word (the loss is ~1e-5, float noise at that size): also
    # ask for a weight well inside (0, 1), an untrained head's on the image tokens
    image = (batch.input_ids[0] == processor.image_token_id).nonzero()[:, 0]
    hop += [(2, 5, 0, hop[0][3], image, None)]
    with torch.no_grad():
        pointed = [train.Trainee(model, None)(train.chat_inputs(batch, model.config), None, [m])[3] for m in hop]
        with record_attention(model) as rec:
            next(iter(q.generate(model, batch, 1)))
    recorded = [rec.probs(0)[layer, head, keys].sum() for layer, head, _, _, keys, _ in hop]
    assert 0.01 < recorded[1] < 0.99
    assert all(torch.allclose(torch.exp(-p), r, rtol=1e-4) for p, r in zip(pointed, recorded))
    # a mark with shares (WORD_TO_PLACE's kind): the cross-entropy of that head's weights against them
    share = torch.softmax(torch.randn(len(image), generator=torch.Generator().manual_seed(0)), 0)
    with torch.no_grad():
        spread = train.Trainee(model, None)(train.chat_inputs(batch, model.config), None,
                                            [(2, 5, 0, hop[0][3], image, share)])[3]
    assert torch.allclose(spread, -(share @ rec.probs(0)[2, 5, image].log()), rtol=1e-4)
    assert spread > pointed[1] + 1                          # not merely the total weight on those keys
    longer = {"messages": [{"role": "user", "content": [synthetic.media_item(synthetic.draw_scene(random.Random(2),
                           size=(336, 336))), {"type": "text", "text": "Describe the image in one long sentence."}]}],
              "world": ()}
    padded = processor.batch([longer["messages"], examples[0]["messages"]], add_generation_prompt=True)
    shift = padded.input_ids.shape[1] - batch.input_ids.shape[1]          # row 1 is left-padded by this much
    assert shift > 0
    layer, head, _, i, keys, _ = hop[1]
    with torch.no_grad():                                  # the same mark, in a left-padded row: the same weight
        _, _, _, again = train.Trainee(model, None)(train.chat_inputs(padded, model.config), None,
                                                    [(layer, head, 1, i + shift, keys + shift, None)])
    assert torch.allclose(again, pointed[1], rtol=1e-4)


def test_torchrun_two_processes(tmp_path):
    """The unchanged script under torchrun: 2 CPU processes, DistributedDataParallel over gloo, a few steps."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        "-m", "lab.train", "--scale", "0.004", "--batch-size", "4", "--eval", "0", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"world_size": 2' in r.stdout
    model, processor = q.load(out, device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert (out / "training" / "loss_curves.png").stat().st_size > 1000


SAME_START = """
import sys, torch.distributed as dist
from pathlib import Path
from lab import train
dist.init_process_group("gloo")
starts = [int(x) for x in sys.argv[1].split(",")]
try:
    train.same_start(starts[dist.get_rank()], Path("snapshots"))
    said = "goes on"
except RuntimeError as e:
    said = f"stops: {e}"
(Path(sys.argv[2]) / f"rank{dist.get_rank()}.txt").write_text(said)     # one file each: stdout would interleave
dist.destroy_process_group()
"""


@pytest.mark.parametrize("starts", ["3,3", "3,0"])
def test_resumed_processes_must_start_at_the_same_stage(tmp_path, starts):
    """Under torchrun, a process whose snapshot is missing would start over while the others go on: every
    process learns where the others start, and all of them stop with the same explanation if any differs."""
    script = tmp_path / "same_start.py"
    script.write_text(SAME_START)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(train.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                        str(script), starts, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    if starts == "3,3":
        assert said == ["goes on", "goes on"]
    else:
        assert all(s.startswith("stops:") and "[3, 0]" in s and "without --resume" in s for s in said), said


def test_cell_labels_name_the_shapes_under_the_merged_tokens(tok):
    """One label per merged token, in the merger's raster order: the cell under each circle / square centre
    carries its kind and colour, and the labelled cells name exactly the scene's shapes."""
    processor, rng = train.nano_processor(tok), random.Random(2)
    for _ in range(20):
        scene = synthetic.draw_scene(rng, size=(224, 224))                 # = the pixel cap: no resize
        kinds, colors, digits, places, motion, *_ = train.cell_labels(scene, processor)
        assert kinds.shape == colors.shape == digits.shape == places.shape == motion.shape == (64,)   # 8 x 8 tokens
        assert not digits.any() and not places.any() and not motion.any()
        found = {(synthetic.SHAPES[k - 1], list(synthetic.COLORS)[c - 1]) for k, c in zip(kinds.tolist(),
                                                                                          colors.tolist()) if k}
        assert found == {(s.kind, s.color) for s in scene.shapes}
        for s in scene.shapes:
            if s.kind != "triangle":                                       # a triangle's box centre is its tip's side
                cx, cy = (s.box[0] + s.box[2]) // 2, (s.box[1] + s.box[3]) // 2
                assert kinds[(cy // 28) * 8 + cx // 28] == 1 + synthetic.SHAPES.index(s.kind)
    for _ in range(10):                                                    # written numbers: the digit under a cell
        scene = synthetic.draw_number_scene(rng, size=(224, 224))
        digits, places = train.cell_labels(scene, processor)[2:4]
        assert {d - 1 for d in digits.tolist() if d} == {d for d, _ in scene.digits}
        assert set(places.tolist()) == set(range(len(scene.digits) + 1))
        assert ((digits > 0) == (places > 0)).all()
    for _ in range(10):                                                    # clips: one row per merged video token
        clip = synthetic.draw_clip(rng)
        rows, grid, info = processor.encode_media(synthetic.media_item(clip))
        kinds, colors, digits, places, motion, *_ = train.cell_labels(clip, processor)
        assert kinds.shape == motion.shape == (info["tokens"],) and rows.shape[0] == 4 * info["tokens"]
        assert set(motion.tolist()) == {0, 1 + synthetic.DIRECTIONS.index(clip.direction)}
        moving = (kinds == 1 + synthetic.SHAPES.index(clip.moving.kind)) & \
            (colors == 1 + list(synthetic.COLORS).index(clip.moving.color))
        assert moving.any() and not (moving & (motion == 0)).any()          # where it is, it moves
        per_t = info["tokens"] // grid[0, 0]                               # the shape is seen in every frame pair
        assert all(motion[t * per_t:(t + 1) * per_t].any() for t in range(grid[0, 0]))


def test_cell_labels_take_the_majority_class_of_each_cell(tok):
    """cell_labels' vectorised count against a plain loop over the cells of resized label maps: the class
    covering most of a 28x28 cell (background only if nothing else covers 1/16 of it), scenes and clips."""
    from collections import Counter
    from PIL import Image
    processor, rng = train.nano_processor(tok), random.Random(5)
    items = [synthetic.draw_scene(rng, number=k % 2 == 1) for k in range(6)] + [synthetic.draw_clip(rng)]
    for item in items:
        grid = processor.encode_media(synthetic.media_item(item))[1][0].tolist()
        got = train.cell_labels(item, processor, grid)
        side = processor.patch_size * processor.merge_size                # 28 px: one merged token
        h, w = grid[1] * processor.patch_size, grid[2] * processor.patch_size
        frames = [synthetic.clip_label_maps(item, min(2 * t, len(item.frames) - 1)) if isinstance(item, synthetic.Clip)
                  else synthetic.label_maps(item) for t in range(grid[0])]
        for k in range(len(frames[0])):                                    # the label maps' classes
            want = []
            for maps in frames:
                pixels = maps[k].resize((w, h), Image.NEAREST).load()
                for cy in range(h // side):
                    for cx in range(w // side):
                        count = Counter(pixels[x, y] for y in range(side * cy, side * cy + side)
                                        for x in range(side * cx, side * cx + side))
                        count.pop(0, None)
                        best = max(sorted(count), key=count.get, default=0)      # ties: the lower class
                        want.append(best if count.get(best, 0) * 16 >= side * side else 0)
            assert got[k].tolist() == want


def test_vit_warm_up_lowers_its_loss_and_trains_only_the_vit(tok):
    torch.manual_seed(0)
    processor = train.nano_processor(tok)
    model = train.init_weights(q.Qwen2VL(train.nano_config(tok)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = next(st for st in train.STAGES if st.loss_on == "cells")
    stage = dataclasses.replace(stage, steps=60)
    losses = train.train_stage(model, processor, stage, random.Random(0), 8, torch.device("cpu"), "mrope", 0, 1,
                               show=False)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("visual.") for k in changed)      # the throwaway heads are not kept
    assert set(model.state_dict()) == set(before)
    assert all(p.requires_grad for p in model.parameters())


def test_cell_accuracy_counts_only_the_cells_that_hold_something(tok):
    """Heads that know every label score 1 per head; heads that always say "background" score 0."""
    processor = train.nano_processor(tok)
    model = train.init_weights(q.Qwen2VL(train.nano_config(tok)))
    _, targets = train.scene_batch(processor, random.Random(5), 12, "cpu")
    oracle = lambda f: tuple(torch.nn.functional.one_hot(t, n).float() for t, n in zip(targets, train.CELL_CLASSES))
    blind = lambda f: tuple(torch.zeros(len(t), n).index_fill_(1, torch.tensor([0]), 1.0)
                            for t, n in zip(targets, train.CELL_CLASSES))
    assert train.cell_accuracy(model, oracle, processor, random.Random(5), "cpu", n=12) == \
        {name: 1.0 for name in train.CELL_NAMES + ("written digit",)}
    assert train.cell_accuracy(model, blind, processor, random.Random(5), "cpu", n=12) == \
        {name: 0.0 for name in train.CELL_NAMES + ("written digit",)}
    # the picture's count is asked of every cell, background too: heads that miss it there score the shapes' share
    count = train.CELL_NAMES.index("count")
    off = lambda f: tuple(torch.nn.functional.one_hot(torch.where(targets[0] > 0, t, (t + 1) % n) if k == count
                                                      else t, n).float()
                          for k, (t, n) in enumerate(zip(targets, train.CELL_CLASSES)))
    assert train.cell_accuracy(model, off, processor, random.Random(5), "cpu", n=12)["count"] == \
        round((targets[0] > 0).float().mean().item(), 3) < 0.5


def test_scene_batch_numbers_each_written_digit_and_pool_digits_averages_over_it(tok):
    """glyph: one id per (picture, written digit), on exactly the tokens that show that digit; pool_digits gives
    one row per written digit, the mean of its tokens' logits, labelled with its digit. A head that is right on
    a third of a digit's tokens and spreads its weight elsewhere is right for the digit."""
    processor = train.nano_processor(tok)
    _, targets = train.scene_batch(processor, random.Random(3), 12, "cpu")
    digit, place, glyph = targets[train.CELL_NAMES.index("digit")], targets[train.CELL_NAMES.index("place")], targets[-1]
    assert ((glyph >= 0) == (place > 0)).all() and (digit[glyph >= 0] > 0).all()
    ids = glyph[glyph >= 0].unique()
    assert len(ids) >= 4                                                   # 12 pictures: several hold a number
    for g in ids:
        assert len(digit[glyph == g].unique()) == 1 and len(place[glyph == g].unique()) == 1
    logits = torch.zeros(len(digit), 11)
    for g in ids:                                          # one token in three says the digit loudly
        shown = (glyph == g).nonzero()[:, 0]
        logits[shown, (digit[shown] % 10) + 1] = 1.0       # the others name the next digit, weakly ...
        logits[shown[::3], digit[shown[::3]]] = 5.0        # ... and every third token the right one, strongly
    pooled, labels = train.pool_digits(logits, digit, glyph)
    assert pooled.shape == (len(ids), 11) and sorted(labels.tolist()) == sorted(digit[glyph == g][0].item()
                                                                                 for g in ids)
    assert (pooled.argmax(-1) == labels).all()
    assert torch.allclose(pooled[0], logits[glyph == ids[0]].mean(0))


def test_cell_loss_adds_the_pooled_digit_loss_at_its_weight(tok):
    processor = train.nano_processor(tok)
    _, targets = train.scene_batch(processor, random.Random(4), 8, "cpu")
    cells = tuple(torch.randn(len(targets[0]), n) for n in train.CELL_CLASSES)
    digit = train.CELL_NAMES.index("digit")
    pooled = torch.nn.functional.cross_entropy(*train.pool_digits(cells[digit], targets[digit], targets[-1]))
    assert torch.allclose(train.cell_loss(cells, targets, 0.5), train.cell_loss(cells, targets) + 0.5 * pooled)


def test_the_pooled_digit_loss_starts_after_the_vit_warm_up():
    """The place of a digit is learned only from the per-token loss: with the pooled one from the start it was
    never learned (docs/experiments/number-reading.md), so the warm-up has none and stages 1-2 add it."""
    warm_up = next(s for s in train.STAGES if s.loss_on == "cells")
    assert warm_up.pooled == 0 and all(s.pooled > 0 for s in train.STAGES if s.cells and s is not warm_up)


def test_an_interrupted_run_resumes_after_its_last_finished_stage(tmp_path, monkeypatch):
    """A run stopped in stage 3 leaves the state after stage 2 beside its output; `resume` trains only stage 3
    and ends with exactly the weights of a run that went straight through. Nothing is left behind. (Stages 2 and
    3 train grounding heads here, so that their state too has to come back.)"""
    kw = dict(scale=1.0, batch_size=2, evaluate_n=0, show=False,
              stages=[dataclasses.replace(s, steps=2, cells=min(s.cells, 2), ground=s.name[0] in "23")
                      for s in train.STAGES])
    train.train(tmp_path / "whole", **kw)
    real, ran = train.train_stage, []

    def counted(model, processor, stage, *args, **kwargs):
        ran.append(stage.name)
        return real(model, processor, stage, *args, **kwargs)

    def stop_in_stage_3(model, processor, stage, *args, **kwargs):
        if stage.name.startswith("3"):
            raise KeyboardInterrupt
        return real(model, processor, stage, *args, **kwargs)

    monkeypatch.setattr(train, "train_stage", stop_in_stage_3)
    with pytest.raises(KeyboardInterrupt):
        train.train(tmp_path / "cut", **kw)
    assert not (tmp_path / "cut").exists()
    last_finished = len(train.STAGES) - 2
    assert sorted(p.name for p in train.snapshot_dir(tmp_path / "cut").iterdir()) == [f"{last_finished}.rank0.pt"]

    monkeypatch.setattr(train, "train_stage", counted)
    summary = train.train(tmp_path / "cut", resume=True, **kw)
    assert ran == [train.STAGES[-1].name]
    assert list(summary["stage_seconds"]) == [s.name for s in train.STAGES]
    whole, _ = q.load(tmp_path / "whole", device="cpu")
    cut, _ = q.load(tmp_path / "cut", device="cpu")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, cut.state_dict()[name]), name
    assert not train.snapshot_dir(tmp_path / "cut").exists()

    monkeypatch.setattr(train, "train_stage", stop_in_stage_3)      # stopped again, then resumed with other
    with pytest.raises(KeyboardInterrupt):                          # settings: that state does not apply
        train.train(tmp_path / "other", **kw)
    monkeypatch.setattr(train, "train_stage", counted)
    ran.clear()
    train.train(tmp_path / "other", resume=True, **{**kw, "batch_size": 4})
    assert ran == [s.name for s in train.STAGES]


def test_a_run_writes_its_failure_analysis_from_its_own_evaluation(tmp_path):
    """The run's one evaluation pass gives both the card's accuracy table and its "Where it fails" section."""
    stages = [dataclasses.replace(s, steps=1, cells=min(s.cells, 2)) for s in train.STAGES]
    summary = train.train(tmp_path / "run", scale=1.0, batch_size=2, evaluate_n=2, show=False, stages=stages)
    saved = json.loads((tmp_path / "run" / "training" / "failures.json").read_text())
    assert saved["n"] == 2 and saved["scores"] == summary["evaluation"]
    assert sum(asked for _, asked in saved["by_shapes"]["color"].values()) == 2
    card = (tmp_path / "run" / "README.md").read_text()
    assert "the answers of the table above" in card
    probed = json.loads((tmp_path / "run" / "training" / "probe.json").read_text())    # and its own probe
    assert probed["model"]["scenes"] == 100 and "## Is the answer in the visual tokens?" in card


def test_the_recipe_still_starts_as_the_shipped_run_did():
    """The shipped checkpoint is what `python -m lab.train` makes (seed 0), so a change to the recipe, the world's
    drawings or their labels must come with a retrained checkpoint. The training log shipped with the checkpoint
    holds the loss of every step; the first steps of the text warm-up and of the ViT warm-up after it must give
    the same losses here. (On the machine that trained it, the full recipe repeated them bit for bit as far as that
    was checked, through stage 1 and 150 steps of stage 2; other CPUs may round differently in the last digits,
    hence the tolerance.)"""
    shipped = json.loads((train.NANO_DIR / "training" / "log.json").read_text())["losses"]
    model, processor, rng, heads = train.start(seed=0)
    text, vit = train.STAGES[:2]
    before = rng.getstate()
    got = {text.name: train.train_stage(model, processor, text, rng, 8, "cpu", "mrope", 0, 1, show=False, stop=30)}
    # The ViT warm-up trains the ViT alone on fresh drawings: what it sees depends on the text warm-up only through
    # the examples that stage drew, one batch per step, so drawing them stands in for training on them.
    rng.setstate(before)
    drawn = train.batches(rng, text.weights, 8)
    for _ in range(text.steps):
        next(drawn)
    got[vit.name] = train.train_stage(model, processor, vit, rng, 8, "cpu", "mrope", 0, 1, show=False,
                                      heads=heads, stop=30)
    for name, losses in got.items():
        want = shipped[name][:len(losses)]
        assert len(losses) == 30 and losses == pytest.approx(want, rel=1e-3), name
