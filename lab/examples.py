"""The app's bundled examples, drawn from the nano's world: `python -m lab.examples` writes examples/.

scene.png (three shapes, exactly one circle), two_a.png / two_b.png (1 and 3 shapes), number.png and clip.mp4
(a red square moving up across 8 frames at 2 fps). Seeded: the same files every time.
"""
import random
from pathlib import Path

import numpy as np

from . import synthetic as S

OUT = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = (   # (question, files in OUT, the right answer): the app's example buttons and the app's tests
    ("What color is the circle?", ("scene.png",), "green."),
    ("Which image has more shapes?", ("two_a.png", "two_b.png"), "the second image."),
    ("What color is the moving shape?", ("clip.mp4",), "red."),
    ("Which way is the red square moving?", ("clip.mp4",), "up."),
    ("Where is the green circle?", ("scene.png",), "bottom left."),
    ("What number is written?", ("number.png",), "139."),
)
# What the pictures show (checked when they are drawn); the examples above ask what the nano answers well.
FACTS = {"circle": "green.", "green": "circle.", "where": "bottom left.", "two": "the second image.", "direction": "up.",
         "moving": "red.", "count": "3.", "number": "139."}


def _first(draw, accept, seed=0):
    """The first drawing (seeds seed, seed+1, ...) that `accept` likes."""
    while True:
        item = draw(random.Random(seed))
        if accept(item):
            return item
        seed += 1


def write_clip(frames, path, fps=2):
    """Frames (PIL images) -> an H.264 mp4 written with PyAV."""
    import av
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size[0] // 2 * 2, frames[0].size[1] // 2 * 2
        stream.pix_fmt = "yuv420p"
        for f in frames:
            arr = np.asarray(f)[:stream.height, :stream.width]
            c.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")))
        c.mux(stream.encode())


def write_examples(out=OUT):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scene = _first(lambda r: S.draw_scene(r, size=(224, 224)), lambda s: [x.kind for x in s.shapes].count("circle") == 1
                   and len(s.shapes) == 3)
    scene.image.save(out / "scene.png")
    a = _first(lambda r: S.draw_scene(r, n_shapes=1, size=(200, 160)), lambda s: True, seed=10)
    b = _first(lambda r: S.draw_scene(r, n_shapes=3, size=(200, 160)), lambda s: True, seed=20)
    a.image.save(out / "two_a.png")
    b.image.save(out / "two_b.png")
    number = _first(lambda r: S.draw_number_scene(r, size=(224, 168)), lambda s: s.number is not None
                    and s.number >= 10, seed=30)
    number.image.save(out / "number.png")
    clip = _first(lambda r: S.draw_clip(r, n_frames=8, size=(224, 168)),
                  lambda c: (c.moving.color, c.moving.kind) == ("red", "square"), seed=40)
    write_clip(list(clip.frames), out / "clip.mp4")
    truth = {"circle": f"{next(x.color for x in scene.shapes if x.kind == 'circle')}.",
             "green": f"{next(x.kind for x in scene.shapes if x.color == 'green')}.",
             "where": f"{next(x.region for x in scene.shapes if x.kind == 'circle')}.", "two": "the second image.",
             "direction": f"{clip.direction}.", "moving": f"{clip.moving.color}.", "count": f"{len(scene.shapes)}.",
             "number": f"{number.number}."}
    if truth != FACTS:                      # the drawing code changed: FACTS and EXAMPLES must follow it
        raise RuntimeError(f"the examples now show {truth}, but FACTS says {FACTS}; update FACTS and EXAMPLES")
    return truth


if __name__ == "__main__":
    print(write_examples())
