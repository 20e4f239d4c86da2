"""The nano model's visual world: seeded, endless, drawn with PIL in about a millisecond per sample.

Scenes of 1-3 coloured shapes in a 3x3 grid of regions on a light canvas, written numbers, short clips of one
shape moving, and the questions and answers about them as chats in the processor's message format. Every
function takes the caller's `random.Random`, so a seed fixes a sample and no global random state is touched.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
SCENE_SIDE, CLIP_SIDE = (112, 336), (112, 224)     # each side of the canvas, in px, drawn independently
MARGIN = 2              # px kept free at the canvas edge (corners stay background) and between objects
SUPERSAMPLE = 3         # shape masks are drawn 3x larger and shrunk: anti-aliased edges at little cost
EXACT_SHARE = 0.6       # how often a question uses its category's exact phrasing (the evaluation's)
MAX_TURNS = 6           # a multi-turn chat about one scene asks 2-6 questions: many answers per image encoded


@dataclass(frozen=True)
class Shape:
    kind: str                           # one of SHAPES
    color: str                          # a key of COLORS
    region: str                         # one of REGIONS: the grid cell holding the box's centre
    box: tuple[int, int, int, int]      # x0, y0, x1, y1 in px, x1/y1 exclusive (width = x1 - x0)


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]
    number: int | None                  # the written number, if any
    digits: tuple[tuple[int, tuple[int, int, int, int]], ...] = ()   # each written digit and its ink box


@dataclass(frozen=True)
class Clip:
    frames: tuple[Image.Image, ...]
    moving: Shape                       # box and region as in the first frame
    direction: str                      # one of DIRECTIONS
    static: Shape | None
    boxes: tuple[tuple[int, int, int, int], ...] = ()   # the moving shape's box in every frame


# ---------------------------------------------------------------------------------------------- drawing
def _jitter(rng: random.Random, rgb) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in rgb)


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(230, 255)
    if rng.random() < 0.5:              # half the canvases get a faint tint: channels a few levels apart
        return tuple(min(255, max(225, base + rng.randint(-5, 5))) for _ in range(3))
    return (base, base, base)


@lru_cache(maxsize=None)                # ~3 kinds x ~100 sizes, so the cache stays small
def _mask(kind: str, side: int) -> Image.Image:
    big = side * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse((0, 0, big - 1, big - 1), fill=255)
    elif kind == "square":
        draw.rectangle((0, 0, big - 1, big - 1), fill=255)
    else:                               # isosceles, pointing up, filling its box
        draw.polygon([(big / 2, 0), (big - 1, big - 1), (0, big - 1)], fill=255)
    return mask.resize((side, side), Image.LANCZOS)


def _inside(kind: str, box) -> Image.Image:
    """The pixels of a shape's box that the shape covers by at least half (its anti-aliased mask, binarised):
    where the dense labels name it."""
    return _mask(kind, box[2] - box[0]).point(lambda v: 255 if v >= 128 else 0)


def _paint(image: Image.Image, kind: str, box, rgb) -> Image.Image:
    image.paste(rgb, box, _mask(kind, box[2] - box[0]))
    return image


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)      # Pillow >= 10.1: a scalable TrueType font


def _overlaps(a, b, gap: int = MARGIN) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _side_range(w: int, h: int) -> tuple[int, int]:
    return math.ceil(0.20 * min(w, h)), math.floor(0.35 * min(w, h))


def region_of(box, w: int, h: int) -> str:
    """The region whose cell holds the centre of `box` on a w x h canvas."""
    col = min(2, int((box[0] + box[2]) / 2 * 3 / w))
    row = min(2, int((box[1] + box[3]) / 2 * 3 / h))
    return REGIONS[3 * row + col]


def _try_box(rng: random.Random, w: int, h: int, regions, avoid):
    """Rejection sampling of one shape: a free region, a size, a centre near the cell's centre, no overlap."""
    for _ in range(30):
        region = rng.choice(regions)
        row, col = divmod(REGIONS.index(region), 3)
        side = rng.randint(*_side_range(w, h))
        start = []
        for index, span in ((col, w), (row, h)):
            cell = span / 3
            centre = (index + 0.5 + rng.uniform(-0.25, 0.25)) * cell
            centre = min(max(centre, MARGIN + side / 2), span - MARGIN - side / 2)   # stay inside the canvas
            start.append(round(centre - side / 2))
        box = (start[0], start[1], start[0] + side, start[1] + side)
        if region_of(box, w, h) == region and not any(_overlaps(box, other) for other in avoid):
            return region, box
    return None


def _layout(rng: random.Random, w: int, h: int, n: int, avoid=(), exact: bool = True) -> list[Shape]:
    """n shapes in distinct regions, none overlapping each other or `avoid`; fewer only if not `exact`."""
    for _ in range(200):
        shapes: list[Shape] = []
        for _ in range(n):
            free = [r for r in REGIONS if r not in {s.region for s in shapes}]
            found = _try_box(rng, w, h, free, [*avoid, *(s.box for s in shapes)])
            if found is None:
                break
            shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), *found))
        if len(shapes) == n or not exact:
            return shapes
    raise RuntimeError(f"could not place {n} shapes on a {w}x{h} canvas")


def _write_number(rng: random.Random, image: Image.Image):
    """A 1-3 digit number in dark ink, glyphs 35-55 % of the canvas height (less if too wide to fit).
    Returns the number, its ink box and each digit with its own ink box (the dense labels of the ViT warm-up)."""
    digits = rng.randint(1, 3)          # even odds per length, else almost every number has 3 digits
    value = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)
    text, (w, h) = str(value), image.size
    top, bottom = _font(100).getbbox("0123456789")[1::2]
    size = round(rng.uniform(0.35, 0.55) * h * 100 / (bottom - top))
    while True:
        x0, y0, x1, y1 = _font(size).getbbox(text)
        if x1 - x0 <= w - 2 * MARGIN or size <= 8:
            break
        size = min(size - 1, int(size * (w - 2 * MARGIN) / (x1 - x0)))   # narrow canvas: shrink to fit
    x, y = rng.randint(MARGIN, w - MARGIN - (x1 - x0)), rng.randint(MARGIN, h - MARGIN - (y1 - y0))
    grey = rng.randint(0, 60)
    ink = tuple(grey + rng.randint(0, 10) for _ in range(3))
    font, origin = _font(size), (x - x0, y - y0)
    ImageDraw.Draw(image).text(origin, text, font=font, fill=ink)
    glyphs = []                         # digit k starts where the text before it ends (digits do not kern)
    for k, ch in enumerate(text):
        advance, (g0, g1, g2, g3) = font.getlength(text[:k]), font.getbbox(ch)
        glyphs.append((int(ch), (round(origin[0] + advance + g0), origin[1] + g1,
                                 round(origin[0] + advance + g2), origin[1] + g3)))
    return value, (x, y, x + x1 - x0, y + y1 - y0), tuple(glyphs)


def draw_scene(rng: random.Random, n_shapes: int | None = None, number: bool = False,
               size: tuple[int, int] | None = None) -> Scene:
    """1-3 shapes (or `n_shapes`) on a w x h canvas; with `number`, a written number too, and then the
    shapes that do not fit around it are left out."""
    w, h = size or (rng.randint(*SCENE_SIDE), rng.randint(*SCENE_SIDE))
    n = rng.randint(1, 3) if n_shapes is None else n_shapes
    image = Image.new("RGB", (w, h), _background(rng))
    value, text_box, digits = _write_number(rng, image) if number else (None, None, ())
    shapes = _layout(rng, w, h, n, [text_box] if number else [], exact=not number)
    for s in shapes:
        _paint(image, s.kind, s.box, _jitter(rng, COLORS[s.color]))
    return Scene(image, tuple(shapes), value, digits)


def label_maps(scene: Scene) -> tuple[Image.Image, ...]:
    """Per-pixel class maps of a scene ("L" images), the dense labels of the ViT warm-up (lab/train.py): the kind
    and the colour of the shape covering each pixel (1 + its index in SHAPES / COLORS), the written digit whose
    ink box holds it (1 + the digit) and that digit's place in the number (1 = first from the left), and the
    motion there (1 + its index in DIRECTIONS; a still image: none). 0 = nothing."""
    kind, color, digit, place, motion = (Image.new("L", scene.image.size, 0) for _ in range(5))
    for s in scene.shapes:
        inside = _inside(s.kind, s.box)
        kind.paste(1 + SHAPES.index(s.kind), s.box, inside)
        color.paste(1 + list(COLORS).index(s.color), s.box, inside)
    for k, (value, box) in enumerate(scene.digits):
        digit.paste(1 + value, box)
        place.paste(1 + k, box)
    return kind, color, digit, place, motion


def clip_label_maps(clip: Clip, frame: int) -> tuple[Image.Image, ...]:
    """label_maps of one frame of a clip, whose motion map marks the moving shape in this frame and the next
    (the pair of frames one temporal patch of the ViT sees) with 1 + the clip's direction."""
    shapes = (replace(clip.moving, box=clip.boxes[frame]),) + ((clip.static,) if clip.static else ())
    *still, motion = label_maps(Scene(clip.frames[frame], shapes, None))
    for box in clip.boxes[frame:frame + 2]:
        motion.paste(1 + DIRECTIONS.index(clip.direction), box, _inside(clip.moving.kind, box))
    return (*still, motion)


def draw_number_scene(rng: random.Random, size: tuple[int, int] | None = None) -> Scene:
    return draw_scene(rng, n_shapes=rng.randint(0, 2), number=True, size=size)


def draw_clip(rng: random.Random, n_frames: int | None = None, size: tuple[int, int] | None = None) -> Clip:
    """One shape moving steadily across >= 45 % of the canvas, at 2 fps; maybe a static shape off its path."""
    w, h = size or (rng.randint(*CLIP_SIDE), rng.randint(*CLIP_SIDE))
    n = n_frames or rng.randint(4, 8)
    direction = rng.choice(DIRECTIONS)
    side = rng.randint(*_side_range(w, h))
    along, across = (w, h) if direction in ("left", "right") else (h, w)
    room = along - 2 * MARGIN - side                      # how far the box can travel inside the canvas
    travel = rng.randint(min(room, math.ceil(0.45 * along)), room)
    start, other = rng.randint(MARGIN, MARGIN + room - travel), rng.randint(MARGIN, across - MARGIN - side)
    steps = [start + round(travel * i / (n - 1)) for i in range(n)]
    if direction in ("left", "up"):
        steps.reverse()
    boxes = tuple((p, other, p + side, other + side) if direction in ("left", "right")
                  else (other, p, other + side, p + side) for p in steps)
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    moving = Shape(kind, color, region_of(boxes[0], w, h), boxes[0])
    background = Image.new("RGB", (w, h), _background(rng))
    static = None
    if rng.random() < 0.5:              # the static shape has another colour, so questions stay unambiguous
        x0s, y0s, x1s, y1s = zip(*boxes)            # the static shape avoids the whole swept path
        found = _try_box(rng, w, h, REGIONS, [(min(x0s), min(y0s), max(x1s), max(y1s))])
        if found:
            static = Shape(rng.choice(SHAPES), rng.choice([c for c in COLORS if c != color]), *found)
            _paint(background, static.kind, static.box, _jitter(rng, COLORS[static.color]))
    rgb = _jitter(rng, COLORS[color])
    return Clip(tuple(_paint(background.copy(), kind, box, rgb) for box in boxes), moving, direction, static, boxes)


def describe(scene: Scene) -> str:
    """'A red circle at the top left, a blue square on the right and the number 42.' (row-major order)"""
    where = {"left": "on the left", "right": "on the right"}
    parts = [f"{'an' if s.color == 'orange' else 'a'} {s.color} {s.kind} {where.get(s.region, 'at the ' + s.region)}"
             for s in sorted(scene.shapes, key=lambda s: REGIONS.index(s.region))]
    if scene.number is not None:
        parts.append(f"the number {scene.number}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------- questions
CATEGORIES = ("caption", "color", "shape", "count", "count_kind", "position", "number", "video_direction",
              "video_color", "two_image", "multi_turn", "text_only")
DEFAULT_WEIGHTS = {"caption": 2.0, "color": 1.0, "shape": 1.0, "count": 1.0, "count_kind": 1.0, "position": 1.0,
                   "number": 1.5, "video_direction": 1.0, "video_color": 0.5, "two_image": 0.75,
                   "multi_turn": 1.0, "text_only": 0.75}
TEMPLATES = {   # the first phrasing is the exact one the evaluation asks; the rest are paraphrases
    "caption": ("Describe the image.", "What is in the image?", "Describe this picture.", "What do you see?"),
    "color": ("What color is the {shape}?", "What colour is the {shape}?", "Which color is the {shape}?",
              "Tell me the color of the {shape}."),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?",
              "What kind of shape is the {color} one?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "count_kind": ("How many {shape}s are there?", "How many {shape}s can you see?", "Count the {shape}s."),
    "position": ("Where is the {color} {shape}?", "In which part of the image is the {color} {shape}?",
                 "Where is the {color} {shape} located?"),
    "number": ("What number is written?", "Which number is shown?", "Read the number in the image."),
    "video_direction": ("Which way is the {color} {shape} moving?", "In which direction does the {color} "
                        "{shape} move?", "Where is the {color} {shape} going?"),
    "video_color": ("What color is the moving shape?", "Which color is the shape that moves?",
                    "What colour is the moving object?"),
    "two_image": ("Which image has more shapes?", "Which of the two images has more shapes?",
                  "Which picture shows more shapes?"),
    "capability": ("What can you do?", "What are you able to do?", "What can you help me with?",
                   "What kind of questions can you answer?"),
}
GREETINGS = ("Hello!", "Hello", "Hi", "Hi!", "Hey", "Hey there!", "Good morning", "Good afternoon",
             "Good evening", "Hello there!", "Hi, how are you?")
CAN_DO = ("I can answer questions about simple pictures and short videos: shapes, their colors, where they are, "
          "how many there are, written numbers and which way a shape moves.")
GREETING_ANSWER = "Hello! " + CAN_DO
REFUSAL = ("Sorry, I can only answer questions about simple pictures and short videos: shapes, their colors, "
           "where they are, how many there are, written numbers and which way a shape moves.")
OFF_TOPIC = (  # anything outside the world gets REFUSAL, never an invented answer
    "What is the capital of France?", "Write a poem.", "Explain quantum physics.", "Who won the World Cup?",
    "Tell me a joke.", "What is 17 times 23?", "Translate 'thank you' into German.", "What's the weather like?",
    "Who are you voting for?", "Write a Python function that sorts a list.", "How do I bake bread?",
    "What is the meaning of life?", "Summarize the news today.", "Recommend a good movie.", "What time is it?",
    "How tall is Mount Everest?", "Who wrote Hamlet?", "Can you book me a flight?", "How do vaccines work?",
    "What is the best programming language?", "Explain how a car engine works.", "Write an essay about dogs.",
    "What should I eat for dinner?", "Tell me a story.", "What is the stock price of Apple?", "Who are you?",
    "How far away is the Moon?", "Give me some investment advice.", "What is your favourite song?",
    "Solve x^2 - 4 = 0.", "Who painted the Mona Lisa?", "How do I fix my wifi?", "Write a limerick about cats.",
    "What year did World War II end?", "Explain the theory of relativity.")


def _phrase(rng: random.Random, key: str, exact: float = EXACT_SHARE, **fields) -> str:
    options = TEMPLATES[key]
    return (options[0] if rng.random() < exact else rng.choice(options[1:])).format(**fields)


def _scene_questions(scene: Scene) -> list[tuple[str, dict, str]]:
    """Every (category, template fields, answer) that has exactly one right answer about this scene."""
    kinds, colors = [s.kind for s in scene.shapes], [s.color for s in scene.shapes]
    pairs = list(zip(colors, kinds))
    out = [("caption", {}, describe(scene)), ("count", {}, f"{len(scene.shapes)}.")]
    out += [("count_kind", {"shape": k}, f"{kinds.count(k)}.") for k in SHAPES]
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            out.append(("color", {"shape": s.kind}, f"{s.color}."))
        if colors.count(s.color) == 1:
            out.append(("shape", {"color": s.color}, f"{s.kind}."))
        if pairs.count((s.color, s.kind)) == 1:
            out.append(("position", {"color": s.color, "shape": s.kind}, f"{s.region}."))
    if scene.number is not None:
        out.append(("number", {}, f"{scene.number}."))
    return out


def _clip_questions(clip: Clip) -> list[tuple[str, dict, str]]:
    fields = {"color": clip.moving.color, "shape": clip.moving.kind}
    return [("video_direction", fields, f"{clip.direction}."), ("video_color", {}, f"{clip.moving.color}.")]


def _chat(rng: random.Random, media: list[dict], turns, exact: float = EXACT_SHARE) -> list[dict]:
    """User/assistant turns about the same media; only the first user turn carries it."""
    messages = []
    for i, (key, fields, answer) in enumerate(turns):
        text = {"type": "text", "text": _phrase(rng, key, exact, **fields)}
        messages.append({"role": "user", "content": (media if i == 0 else []) + [text]})
        messages.append({"role": "assistant", "content": answer})
    return messages


def media_item(item: Scene | Clip) -> dict:
    """A scene or clip as a message content item."""
    if isinstance(item, Clip):
        return {"type": "video", "video": list(item.frames), "fps": 2.0}
    return {"type": "image", "image": item.image}


def make_example(rng: random.Random, category: str, exact: float = EXACT_SHARE) -> dict:
    """One training/evaluation chat: {"category", "messages", "answer" (= the last message's content), "world"
    (the Scene/Clip objects it was drawn from, for checks and display; empty for text-only)}.
    `exact` is how often questions use the specification's exact phrasing (the evaluation passes 1.0)."""
    if category == "text_only":
        roll = rng.random()
        if roll < 0.3:
            question, answer = rng.choice(GREETINGS), GREETING_ANSWER
        elif roll < 0.5:
            question, answer = _phrase(rng, "capability", exact), CAN_DO
        else:
            question, answer = rng.choice(OFF_TOPIC), REFUSAL
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"category": category, "messages": messages, "answer": answer, "world": ()}
    if category in ("video_direction", "video_color"):
        world = (draw_clip(rng),)
        turns = [q for q in _clip_questions(world[0]) if q[0] == category]
    elif category == "two_image":
        counts = rng.sample((1, 2, 3), 2)                 # two different counts: never a tie
        world = tuple(draw_scene(rng, n_shapes=n) for n in counts)
        turns = [("two_image", {}, "the first image." if counts[0] > counts[1] else "the second image.")]
    elif category == "multi_turn":
        if rng.random() < 0.25:
            world = (draw_clip(rng),)
            turns = rng.sample(_clip_questions(world[0]), 2)
        else:
            world = (draw_number_scene(rng) if rng.random() < 0.25 else draw_scene(rng),)
            questions = _scene_questions(world[0])
            turns = rng.sample(questions, rng.randint(2, min(MAX_TURNS, len(questions))))
    elif category in CATEGORIES:                          # the single-image questions
        options = []
        while not options:                # redraw until the scene admits the question (e.g. a unique kind)
            number = category == "number" or rng.random() < 0.2
            world = (draw_number_scene(rng) if number else draw_scene(rng),)
            options = [q for q in _scene_questions(world[0]) if q[0] == category]
        turns = [rng.choice(options)]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    messages = _chat(rng, [media_item(item) for item in world], turns, exact)
    return {"category": category, "messages": messages, "answer": messages[-1]["content"], "world": world}


def sample_example(rng: random.Random, weights: dict[str, float] | None = None) -> dict:
    """A category drawn by weight (DEFAULT_WEIGHTS if None; missing categories get 0), then make_example."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    unknown = set(weights) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; expected some of {CATEGORIES}")
    names = [c for c in CATEGORIES if weights.get(c, 0) > 0]
    if not names:
        raise ValueError("no category has a positive weight")
    return make_example(rng, rng.choices(names, weights=[weights[c] for c in names])[0])
