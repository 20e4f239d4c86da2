"""Held-out accuracy of a model on the synthetic world, per question category.

The questions are drawn with a seed that training never uses and are asked with the exact phrasings of
the specification. The model answers greedily through `qwen2vl_min.generate`, and an answer counts when it
equals the expected one after normalising case and periods ("Red." == "red"). `python -m lab.evaluate` scores a
checkpoint (default: the nano model); `python -m lab.card` writes the model card from the training log.

`failures` reads the same answers a second way, to say *how* the model fails where it does: scene questions split by
the number of shapes in the scene, how many wrong answers name another object of the scene (it saw the objects but
did not bind the question to the right one), and position answers split into their row and column parts.
"""
import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

import qwen2vl_min as q

from . import synthetic

EVAL_SEED = 20_240_919                      # the paper's arXiv date; no training run uses it
TARGETS = {"color": 0.95, "shape": 0.95, "count": 0.90, "position": 0.90, "number": 0.80,
           "video_direction": 0.90, "video_color": 0.95, "two_image": 0.85}
SOURCES = {"count": ("count", "count_kind")}  # "count" alternates both counting questions


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def eval_set(n: int, seed: int = EVAL_SEED) -> dict:
    """category -> n examples whose questions use only the exact phrasings."""
    out = {}
    for cat in TARGETS:
        rng, kinds = random.Random(f"{seed}-{cat}"), SOURCES.get(cat, (cat,))
        out[cat] = [synthetic.make_example(rng, kinds[i % len(kinds)], exact=1.0) for i in range(n)]
    return out


def answer(model, processor, examples, positions="mrope", max_new_tokens=10):
    """The model's greedy answers to the examples' last questions, one batch."""
    from .train import positions as position_ids
    batch = processor.batch([ex["messages"][:-1] for ex in examples], add_generation_prompt=True)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    batch = batch.to(device, dtype)
    pos = position_ids(batch, model.config, positions).to(device) if positions != "mrope" else None
    rows = [[] for _ in examples]
    for step in q.generate(model, batch, max_new_tokens, position_ids=pos):
        for row, token in zip(rows, step if isinstance(step, list) else [step]):
            row.append(token)
    stop = set(processor.eos_token_ids)
    return [processor.decode([t for t in row if t not in stop]) for row in rows]


@torch.inference_mode()
def ask(model, processor, n=200, seed=EVAL_SEED, positions="mrope", batch_size=32, show=True) -> dict:
    """-> {category: [(example, the model's answer), ...]} for n held-out questions per category."""
    sets = eval_set(n, seed)
    answered = {}
    bar = tqdm(total=n * len(sets), desc="evaluate", disable=not show, dynamic_ncols=True)
    for cat, examples in sets.items():
        answered[cat] = []
        for i in range(0, n, batch_size):
            chunk = examples[i:i + batch_size]
            answered[cat] += zip(chunk, answer(model, processor, chunk, positions))
            bar.update(len(chunk))
    bar.close()
    return answered


def right(example, got: str) -> bool:
    return normalise(got) == normalise(example["answer"])


def scores(answered: dict) -> dict:
    """{category: accuracy} of `ask`'s answers."""
    return {cat: sum(right(ex, got) for ex, got in pairs) / len(pairs) for cat, pairs in answered.items()}


def evaluate(model, processor, n=200, seed=EVAL_SEED, positions="mrope", batch_size=32, show=True):
    """-> {category: accuracy} on n held-out questions per category."""
    return scores(ask(model, processor, n, seed, positions, batch_size, show))


BY_SHAPES = ("color", "shape", "count", "position")    # questions about one scene of 0-3 shapes
NAMED = {"color": "color", "shape": "kind"}            # wrong answers that may name another object's attribute


def row_and_column(region: str) -> tuple[str, str]:
    """A region's two parts: "top left" -> ("top", "left"), "top" -> ("top", "center"), "center" -> both center."""
    words = normalise(region).split()
    row = next((w for w in words if w in ("top", "bottom")), "middle")
    return row, next((w for w in words if w in ("left", "right")), "center")


def failures(answered: dict) -> dict:
    """How the answers of `ask` go wrong, from the scenes the questions were drawn from:
    "by_shapes": {category: {"number of shapes": [right, asked]}} for the BY_SHAPES questions;
    "names_another": {category: [wrong answers naming another object's colour / kind, wrong answers]};
    "position_parts": {"row": share right, "column": share right} (a region = a row part and a column part)."""
    out = {"by_shapes": {}, "names_another": {}, "position_parts": {}}
    for cat in BY_SHAPES:
        table = out["by_shapes"][cat] = {}
        for ex, got in answered.get(cat, []):
            cell = table.setdefault(str(len(ex["world"][0].shapes)), [0, 0])     # str: the key JSON keeps
            cell[0] += right(ex, got)
            cell[1] += 1
    for cat, attribute in NAMED.items():
        wrong = [(ex, got) for ex, got in answered.get(cat, []) if not right(ex, got)]
        named = sum(normalise(got) in {getattr(s, attribute) for s in ex["world"][0].shapes} for ex, got in wrong)
        out["names_another"][cat] = [named, len(wrong)]
    pairs = [(row_and_column(got), row_and_column(ex["answer"])) for ex, got in answered.get("position", [])]
    if pairs:
        for i, part in enumerate(("row", "column")):
            out["position_parts"][part] = sum(g[i] == e[i] for g, e in pairs) / len(pairs)
    return out


def save_failures(ckpt, answered: dict, seed: int = EVAL_SEED) -> Path:
    """training/failures.json of a checkpoint: the scores and `failures` of one `ask` (the card shows them)."""
    n = len(next(iter(answered.values())))
    path = Path(ckpt) / "training" / "failures.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"n": n, "seed": seed, "scores": scores(answered), **failures(answered)}, indent=1))
    return path


def table(scores: dict, other: dict | None = None, other_name="") -> str:
    head = "| category | accuracy | target |" + (f" {other_name} |" if other else "")
    rule = "|---|---|---|" + ("---|" if other else "")
    rows = [f"| {c} | {scores[c]:.1%} | ≥ {TARGETS[c]:.0%} |" + (f" {other[c]:.1%} |" if other else "")
            for c in TARGETS if c in scores]
    return "\n".join([head, rule, *rows])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped nano model)")
    p.add_argument("-n", type=int, default=200, help="questions per category")
    p.add_argument("--positions", choices=["mrope", "1d"], default="mrope")
    p.add_argument("--failures", action="store_true",
                   help="also show how the answers go wrong (by number of shapes, binding, row / column)")
    p.add_argument("--write", action="store_true",
                   help="with --failures: save them as training/failures.json of the checkpoint and rewrite its card")
    a = p.parse_args(argv)
    from .card import failure_lines, write_card
    from .train import NANO_DIR
    ckpt = Path(a.model or NANO_DIR)
    if a.write and not a.failures:
        p.error("--write saves the failure analysis: add --failures")
    if a.write and not (ckpt / "training" / "log.json").is_file():
        p.error(f"--write adds to the card of a checkpoint trained by `python -m lab.train`; {ckpt} has no "
                "training/log.json (leave out --write to only print the analysis)")
    model, processor = q.load(ckpt)
    answered = ask(model, processor, a.n, positions=a.positions)
    measured = scores(answered)
    print(table(measured))
    print(json.dumps(measured))
    if a.failures:
        print("\n".join(failure_lines({"n": a.n, **failures(answered)}, "held-out questions per category")))
    if a.write:
        print("wrote", save_failures(ckpt, answered), "and", write_card(ckpt))


if __name__ == "__main__":
    main()
