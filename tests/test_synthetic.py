"""lab/synthetic.py: the invariants of the generated world over a few hundred seeded samples, checked against
the images' pixels and the Scene/Clip metadata; every answer recomputed independently from that metadata."""
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from lab import synthetic as S

COLOR_RE, SHAPE_RE = "|".join(S.COLORS), "|".join(S.SHAPES)
TOL = 22                 # colour jitter is +-20; 2 more for anti-aliasing / LANCZOS ringing at the centre
SHORT_ANSWER = re.compile(r"[a-z0-9 ]+\.")


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(1)
    return [S.draw_scene(rng) for _ in range(300)]


@pytest.fixture(scope="module")
def number_scenes():
    rng = random.Random(2)
    return [S.draw_number_scene(rng) for _ in range(200)]


@pytest.fixture(scope="module")
def clips():
    rng = random.Random(3)
    return [S.draw_clip(rng) for _ in range(150)]


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(4)
    return {c: [S.make_example(rng, c) for _ in range(400 if c == "text_only" else 150)] for c in S.CATEGORIES}


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


def check_shape(shape, arr):
    h, w = arr.shape[:2]
    x0, y0, x1, y1 = shape.box
    assert shape.kind in S.SHAPES and shape.color in S.COLORS and shape.region in S.REGIONS
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (shape, w, h)
    assert x1 - x0 == y1 - y0 and 0.20 * min(w, h) <= x1 - x0 <= 0.35 * min(w, h), (shape, w, h)
    row, col = divmod(S.REGIONS.index(shape.region), 3)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert col * w / 3 <= cx <= (col + 1) * w / 3 and row * h / 3 <= cy <= (row + 1) * h / 3, (shape, w, h)
    centre = arr[int(cy), int(cx)]
    assert np.abs(centre - np.array(S.COLORS[shape.color])).max() <= TOL, (shape, centre)


def check_background(arr):
    for corner in (arr[0, 0], arr[0, -1], arr[-1, 0], arr[-1, -1]):
        assert 225 <= corner.min() and corner.max() <= 255 and corner.max() - corner.min() <= 10, corner


def check_layout(shapes):
    assert len({s.region for s in shapes}) == len(shapes)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


def dark_mask(arr):
    return arr.max(axis=2) <= 90          # no shape colour (even jittered) has all channels this dark


def test_scenes(scenes):
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    for scene in scenes:
        w, h = scene.image.size
        assert 112 <= w <= 336 and 112 <= h <= 336 and scene.image.mode == "RGB" and scene.number is None
        arr = pixels(scene.image)
        check_background(arr)
        check_layout(scene.shapes)
        for shape in scene.shapes:
            check_shape(shape, arr)
        assert not dark_mask(arr).any()
    sizes = [s.image.size for s in scenes]
    assert min(w for w, _ in sizes) < 130 and max(w for w, _ in sizes) > 320 and len(set(sizes)) > 200
    assert all(r in {s.region for sc in scenes for s in sc.shapes} for r in S.REGIONS)
    assert {s.kind for sc in scenes for s in sc.shapes} == set(S.SHAPES)
    assert {s.color for sc in scenes for s in sc.shapes} == set(S.COLORS)


def test_draw_scene_arguments():
    rng = random.Random(5)
    for n in (1, 2, 3):
        scene = S.draw_scene(rng, n_shapes=n, size=(150, 300))
        assert len(scene.shapes) == n and scene.image.size == (150, 300)


def test_number_scenes(number_scenes):
    assert {len(s.shapes) for s in number_scenes} == {0, 1, 2}
    assert {len(str(s.number)) for s in number_scenes} == {1, 2, 3}
    tall = 0
    for scene in number_scenes:
        assert isinstance(scene.number, int) and 0 <= scene.number <= 999
        arr = pixels(scene.image)
        h, w = arr.shape[:2]
        check_background(arr)
        check_layout(scene.shapes)
        for shape in scene.shapes:
            check_shape(shape, arr)
        dark = dark_mask(arr)
        assert dark.sum() >= 50, scene.number
        rows, cols = np.nonzero(dark.any(axis=1))[0], np.nonzero(dark.any(axis=0))[0]
        ink_h, ink_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert ink_h >= 30, (ink_h, scene.image.size)               # legible after the model's 28 px merge
        assert ink_h >= 0.3 * h or ink_w >= 0.8 * w, (ink_h, ink_w, scene.image.size)   # tall, or fills the width
        tall += ink_h >= 0.3 * h
        for x0, y0, x1, y1 in (s.box for s in scene.shapes):
            assert not dark[y0:y1, x0:x1].any()                       # shapes stay clear of the text
    assert tall >= 0.6 * len(number_scenes)


def test_clip_label_maps_follow_the_moving_shape(clips):
    """A clip frame's maps: the moving shape where it is in that frame, the static one where it stays, and the
    motion map = 1 + the direction exactly on the moving shape in this frame and the next."""
    for clip in clips[:30]:
        for f in range(len(clip.frames)):
            kind, color, digit, place, motion = (np.array(m) for m in S.clip_label_maps(clip, f))
            x0, y0, x1, y1 = clip.boxes[f]
            assert (kind[y0:y1, x0:x1] == 1 + S.SHAPES.index(clip.moving.kind)).mean() > 0.4
            assert (color[y0:y1, x0:x1][kind[y0:y1, x0:x1] > 0] == 1 + list(S.COLORS).index(clip.moving.color)).all()
            if clip.static:
                sx0, sy0, sx1, sy1 = clip.static.box
                assert (color[sy0:sy1, sx0:sx1] == 1 + list(S.COLORS).index(clip.static.color)).mean() > 0.4
                assert not motion[sy0:sy1, sx0:sx1].any()                 # the static shape is off the path
            assert set(np.unique(motion)) == {0, 1 + S.DIRECTIONS.index(clip.direction)}
            assert not digit.any() and not place.any()
            moved = np.zeros_like(motion, dtype=bool)
            for bx0, by0, bx1, by1 in clip.boxes[f:f + 2]:
                moved[by0:by1, bx0:bx1] = True
            assert not (motion > 0)[~moved].any() and (motion > 0)[y0:y1, x0:x1].mean() > 0.4


def test_digit_boxes_spell_the_number_and_hold_its_ink(number_scenes):
    """The digit labels: one box per written digit, left to right, spelling the number; every dark pixel lies in
    a box, every box holds ink, and inside its box the digit map is 1 + the digit, the place map 1 + its place."""
    for scene in number_scenes:
        assert "".join(str(d) for d, _ in scene.digits) == str(scene.number)
        assert all(a[1][2] <= b[1][0] + 1 for a, b in zip(scene.digits, scene.digits[1:]))    # left to right
        dark = dark_mask(pixels(scene.image))
        covered = np.zeros_like(dark)
        digit_map, place_map = (np.array(m) for m in S.label_maps(scene)[2:4])
        for k, (d, (x0, y0, x1, y1)) in enumerate(scene.digits):
            assert dark[y0:y1, x0:x1].sum() >= 10
            covered[y0:y1, x0:x1] = True
            assert (digit_map[y0:y1, x0:x1] == 1 + d).mean() > 0.9                 # neighbours may touch
            assert (place_map[y0:y1, x0:x1] == 1 + k).mean() > 0.9                 # first, second, third
        assert not (dark & ~covered).any()


def ink_crop(image, size=(96, 48)):
    """The dark pixels' bounding box, binarised and resized to a fixed size, as a float array."""
    dark = dark_mask(pixels(image))
    rows, cols = np.nonzero(dark.any(axis=1))[0], np.nonzero(dark.any(axis=0))[0]
    crop = Image.fromarray(dark[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8) * 255)
    return np.asarray(crop.resize(size, Image.BILINEAR)) / 255


def test_number_glyphs_match_the_number(number_scenes):
    """A tiny OCR: the ink matches the number's own digits, rendered alone, better than any other number's."""
    def rendered(n):
        image = Image.new("RGB", (400, 160), "white")
        ImageDraw.Draw(image).text((10, 10), str(n), font=ImageFont.load_default(size=100), fill="black")
        return ink_crop(image)
    for scene in number_scenes[:40]:
        n, ink = scene.number, ink_crop(scene.image)
        lo, hi = (0, 9) if n < 10 else (10, 99) if n < 100 else (100, 999)
        rivals = {lo + (n - lo + k) % (hi - lo + 1) for k in (1, 7, 37, 5 * (hi - lo) // 9)} - {n}   # same length
        errors = {m: np.abs(ink - rendered(m)).mean() for m in rivals | {n}}
        assert min(errors, key=errors.get) == n, (n, errors)
    assert len({s.number for s in number_scenes}) > 100


def test_clips(clips):
    assert {len(c.frames) for c in clips} == set(range(4, 9))
    assert {c.direction for c in clips} == set(S.DIRECTIONS)
    assert any(c.static for c in clips) and not all(c.static for c in clips)
    for clip in clips:
        w, h = clip.frames[0].size
        assert 112 <= w <= 224 and 112 <= h <= 224 and all(f.size == (w, h) for f in clip.frames)
        assert len(clip.boxes) == len(clip.frames) and clip.moving.box == clip.boxes[0]
        horizontal = clip.direction in ("left", "right")
        axis, sign = (0 if horizontal else 1), (1 if clip.direction in ("right", "down") else -1)
        starts = [b[axis] * sign for b in clip.boxes]
        assert all(b > a for a, b in zip(starts, starts[1:])), clip.boxes      # steady, one way
        assert len({b[1 - axis] for b in clip.boxes}) == 1                      # no drift across
        assert abs(starts[-1] - starts[0]) >= 0.4 * (w if horizontal else h)
        arrs = [pixels(f) for f in clip.frames]
        check_background(arrs[0])
        for box, arr in zip(clip.boxes, arrs):
            check_shape(S.Shape(clip.moving.kind, clip.moving.color, S.region_of(box, w, h), box), arr)
            if clip.static:
                check_layout([clip.static, S.Shape("circle", "red", "?", box)])
                check_shape(clip.static, arr)
        if clip.static:
            assert clip.static.color != clip.moving.color
        # the pixels of the moving colour move the same way as the boxes say
        rgb = arrs[0][(clip.boxes[0][1] + clip.boxes[0][3]) // 2, (clip.boxes[0][0] + clip.boxes[0][2]) // 2]
        centroids = [np.nonzero(np.abs(a - rgb).max(axis=2) <= 12)[1 - axis].mean() * sign for a in arrs]
        assert all(b > a for a, b in zip(centroids, centroids[1:])), (clip.direction, centroids)


def test_determinism():
    def fingerprint(seed):
        rng = random.Random(seed)
        scene, clip, number = S.draw_scene(rng), S.draw_clip(rng), S.draw_number_scene(rng)
        ex = S.make_example(rng, "multi_turn")
        texts = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"] for m in ex["messages"]]
        return [scene.image.tobytes(), number.image.tobytes(), *(f.tobytes() for f in clip.frames), *texts]
    assert fingerprint(7) == fingerprint(7)
    assert fingerprint(7)[:2] != fingerprint(8)[:2]
    state = random.getstate()
    fingerprint(9)
    assert random.getstate() == state                                   # no global random state touched


def parse(question):
    """(template key, fields) of the template that produced `question`, recovered from the text alone."""
    for key, options in S.TEMPLATES.items():
        for i, template in enumerate(options):
            pattern = re.escape(template).replace(r"\{shape\}", f"(?P<shape>{SHAPE_RE})")
            pattern = pattern.replace(r"\{color\}", f"(?P<color>{COLOR_RE})")
            m = re.fullmatch(pattern, question)
            if m:
                return key, m.groupdict(), i == 0
    raise AssertionError(f"question from no template: {question!r}")


def caption_ok(scene, caption):
    assert caption[0].isupper() and caption.endswith(".")
    mentions = re.findall(rf"\b({COLOR_RE}) ({SHAPE_RE})\b", caption)
    assert len(mentions) == len(scene.shapes)
    for s in scene.shapes:
        where = ("on the " if s.region in ("left", "right") else "at the ") + s.region
        assert re.search(rf"\b{s.color} {s.kind} {where}(,| and|\.)", caption), (s, caption)
    assert ("the number" in caption.lower()) == (scene.number is not None)
    if scene.number is not None:
        assert caption.lower().endswith(f"the number {scene.number}.")
    return True


def expected(key, fields, world):
    """The answer recomputed from the Scene / Clip metadata; asserts the question is answerable."""
    if key == "two_image":
        a, b = (len(s.shapes) for s in world)
        assert a != b
        return "the first image." if a > b else "the second image."
    if key.startswith("video_"):
        clip = world[0]
        if key == "video_color":
            return f"{clip.moving.color}."
        assert (fields["color"], fields["shape"]) == (clip.moving.color, clip.moving.kind)
        return f"{clip.direction}."
    shapes = world[0].shapes
    if key == "count":
        return f"{len(shapes)}."
    if key == "count_kind":
        return f"{sum(s.kind == fields['shape'] for s in shapes)}."
    if key == "number":
        assert world[0].number is not None
        return f"{world[0].number}."
    match = [s for s in shapes if all(getattr(s, "kind" if f == "shape" else f) == v for f, v in fields.items())]
    assert len(match) == 1, (key, fields, shapes)                        # asked only when unambiguous
    return {"color": f"{match[0].color}.", "shape": f"{match[0].kind}.", "position": f"{match[0].region}."}[key]


def check_turn(question, answer, world):
    key, fields, _ = parse(question)
    if key == "caption":
        assert caption_ok(world[0], answer)
    else:
        assert answer == expected(key, fields, world), (question, answer)
        assert SHORT_ANSWER.fullmatch(answer)
    return key


def check_format(ex):
    msgs = ex["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) and len(msgs) % 2 == 0
    assert ex["answer"] == msgs[-1]["content"] and isinstance(ex["answer"], str)
    for i, m in enumerate(msgs[2::2]):                                   # later user turns: text only
        assert [c["type"] for c in m["content"]] == ["text"]
    return msgs


@pytest.mark.parametrize("category", [c for c in S.CATEGORIES if c not in ("multi_turn", "text_only")])
def test_single_turn_answers(examples, category):
    exact = 0
    for ex in examples[category]:
        msgs = check_format(ex)
        assert ex["category"] == category and len(msgs) == 2
        content = msgs[0]["content"]
        media, text = content[:-1], content[-1]
        if category == "two_image":
            assert [c["type"] for c in media] == ["image", "image"]
            assert all(isinstance(c["image"], Image.Image) for c in media)
        elif category.startswith("video_"):
            assert len(media) == 1 and media[0]["type"] == "video" and media[0]["fps"] == 2.0
            assert [f.tobytes() for f in media[0]["video"]] == [f.tobytes() for f in ex["world"][0].frames]
        else:
            assert len(media) == 1 and media[0]["image"] is ex["world"][0].image
        key = check_turn(text["text"], ex["answer"], ex["world"])
        assert key == category
        exact += parse(text["text"])[2]
    assert exact >= 0.5 * len(examples[category])                        # the evaluation's phrasing dominates
    answers = {ex["answer"] for ex in examples[category]}
    if category == "count_kind":
        assert "0." in answers and "1." in answers
    if category in ("count", "two_image", "video_direction", "color", "shape"):
        assert len(answers) >= {"count": 3, "two_image": 2, "video_direction": 4}.get(category, 3)


def test_multi_turn(examples):
    keys = set()
    for ex in examples["multi_turn"]:
        msgs = check_format(ex)
        assert 4 <= len(msgs) <= 2 * S.MAX_TURNS
        assert msgs[0]["content"][0]["type"] in ("image", "video") and msgs[0]["content"][-1]["type"] == "text"
        questions = [m["content"][-1]["text"] for m in msgs[0::2]]
        assert len(set(questions)) == len(questions)
        for q, a in zip(questions, [m["content"] for m in msgs[1::2]]):
            keys.add(check_turn(q, a, ex["world"]))
    assert {"caption", "count", "video_direction"} <= keys and len({len(e["messages"]) for e in
                                                                    examples["multi_turn"]}) == S.MAX_TURNS - 1


def test_text_only(examples):
    assert len(set(S.OFF_TOPIC)) >= 30
    seen, capability, exact = set(), 0, 0
    for ex in examples["text_only"]:
        msgs = check_format(ex)
        question = msgs[0]["content"]
        assert len(msgs) == 2 and isinstance(question, str) and ex["world"] == ()
        if question in S.GREETINGS:
            assert ex["answer"] == S.GREETING_ANSWER
            seen.add("greeting")
        elif question in S.TEMPLATES["capability"]:
            assert ex["answer"] == S.CAN_DO
            capability += 1
            exact += question == "What can you do?"
        else:
            assert question in S.OFF_TOPIC and ex["answer"] == S.REFUSAL
            seen.add(question)
    assert "greeting" in seen and len(seen) > 25 and capability > 20 and exact >= 0.5 * capability
    for answer in (S.GREETING_ANSWER, S.CAN_DO, S.REFUSAL):
        assert answer.count(".") == 1 and answer.endswith(".") and "shapes" in answer and "videos" in answer


def test_exact_phrasings_present(examples):
    questions = {m["content"][-1]["text"] for exs in examples.values() for ex in exs for m in ex["messages"][0::2]
                 if isinstance(m["content"], list)}
    for phrase in ("Describe the image.", "How many shapes are there?", "What number is written?",
                   "What color is the moving shape?", "Which image has more shapes?"):
        assert phrase in questions
    for template in ("What color is the {shape}?", "What shape is the {color} object?", "How many {shape}s are there?",
                     "Where is the {color} {shape}?", "Which way is the {color} {shape} moving?"):
        pattern = re.escape(template).replace(r"\{shape\}", f"({SHAPE_RE})").replace(r"\{color\}", f"({COLOR_RE})")
        assert any(re.fullmatch(pattern, q) for q in questions), template


def test_describe():
    shapes = (S.Shape("square", "blue", "center", (0, 0, 1, 1)), S.Shape("circle", "red", "top left", (0, 0, 1, 1)),
              S.Shape("triangle", "green", "bottom", (0, 0, 1, 1)))
    scene = S.Scene(None, shapes, None)
    assert S.describe(scene) == ("A red circle at the top left, a blue square at the center and a green triangle "
                                 "at the bottom.")
    assert S.describe(S.Scene(None, shapes[:1], 42)) == "A blue square at the center and the number 42."
    assert S.describe(S.Scene(None, (), 7)) == "The number 7."
    assert S.describe(S.Scene(None, (S.Shape("circle", "orange", "left", (0, 0, 1, 1)),), None)) == \
        "An orange circle on the left."


def test_sample_example():
    rng = random.Random(6)
    cats = [S.sample_example(rng)["category"] for _ in range(300)]
    assert set(cats) == set(S.CATEGORIES)
    assert {S.sample_example(rng, {"number": 1.0, "count": 0.0})["category"] for _ in range(20)} == {"number"}
    with pytest.raises(ValueError):
        S.sample_example(rng, {"weather": 1.0})
    with pytest.raises(ValueError):
        S.make_example(rng, "weather")


def test_label_maps_agree_with_the_pixels(scenes):
    """The ViT warm-up's dense labels: a pixel is labelled with a shape's kind and colour exactly where that
    shape was painted (its colour within the jitter), and 0 on the background."""
    for scene in scenes[:60]:
        kind, color, digit, place, motion = (np.array(m) for m in S.label_maps(scene))
        assert ((kind > 0) == (color > 0)).all() and not motion.any()      # nothing moves in a still image
        assert (digit > 0).any() == (scene.number is not None)
        pixels = np.array(scene.image).astype(int)
        for s in scene.shapes:
            x0, y0, x1, y1 = s.box
            inside = kind[y0:y1, x0:x1] == 1 + S.SHAPES.index(s.kind)
            assert inside.mean() > 0.4                                     # a triangle fills half its box
            assert (color[y0:y1, x0:x1][inside] == 1 + list(S.COLORS).index(s.color)).all()
            painted = np.abs(pixels[y0:y1, x0:x1][inside] - np.array(S.COLORS[s.color])).max(-1)
            assert np.median(painted) <= TOL                                 # labelled pixels wear the colour
        # no label outside the shapes' boxes (boxes never overlap)
        boxes = [s.box for s in scene.shapes]
        assert (kind > 0).sum() == sum((kind[y0:y1, x0:x1] > 0).sum() for x0, y0, x1, y1 in boxes)
