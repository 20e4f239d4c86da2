"""Held-out accuracy of a model on the synthetic world, per question category.

The questions are drawn with a seed that training never uses and are asked with the exact phrasings of
the specification. The model answers greedily through `qwen2vl_min.generate`, and an answer counts when it
equals the expected one after normalising case and periods ("Red." == "red"). `python -m lab.evaluate` scores a
checkpoint (default: the nano model); `python -m lab.card` writes the model card from the training log.
"""
import argparse
import json
import random

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
def evaluate(model, processor, n=200, seed=EVAL_SEED, positions="mrope", batch_size=32, show=True):
    """-> {category: accuracy} on n held-out questions per category."""
    scores = {}
    sets = eval_set(n, seed)
    bar = tqdm(total=n * len(sets), desc="evaluate", disable=not show, dynamic_ncols=True)
    for cat, examples in sets.items():
        right = 0
        for i in range(0, n, batch_size):
            chunk = examples[i:i + batch_size]
            got = answer(model, processor, chunk, positions)
            right += sum(normalise(g) == normalise(ex["answer"]) for g, ex in zip(got, chunk))
            bar.update(len(chunk))
        scores[cat] = right / n
    bar.close()
    return scores


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
    a = p.parse_args(argv)
    from .train import NANO_DIR
    model, processor = q.load(a.model or NANO_DIR)
    scores = evaluate(model, processor, a.n, positions=a.positions)
    print(table(scores))
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
