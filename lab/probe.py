"""Is the answer in the visual tokens? An attention probe on the frozen ViT + merger output.

The nano answers "What shape is the red object?" right even with three shapes in the scene, but "What color
is the triangle?" mostly only when the triangle is alone (see the card's "Where it fails"). Is the
triangle's colour missing from the tokens the LLM receives, or does the LLM not look it up? A probe tells:
one attention head and nothing else (a learned query for each value of the naming attribute, a key map, a
linear read-out) is trained on the frozen visual tokens of fresh two- and three-shape scenes to find the
shape named by one attribute and name another. If one head does it, the tokens hold the answer.
The control is the same probe on a randomly initialised ViT: there it can only guess.

`python -m lab.probe` prints both look-ups for the nano and the control; `--write` saves them as
training/probe.json of the checkpoint and rewrites its card.
Dimension legend: N merged tokens of one scene, C LLM hidden size, D probe key size.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

import qwen2vl_min as q

from . import synthetic

LOOKUPS = (("kind", "color"), ("color", "kind"))      # (the attribute that names the shape, the one asked)
VALUES = {"kind": synthetic.SHAPES, "color": tuple(synthetic.COLORS)}


@torch.no_grad()
def visual_tokens(model, processor, scenes) -> list[torch.Tensor]:
    """What the LLM receives for each scene: the ViT + merger output, (N, C) each, RMS-normalised as the LLM's
    first layer normalises its input (its learned gain aside)."""
    out, weight = [], next(model.parameters())
    for scene in scenes:
        rows, grid, _ = processor.encode_media(synthetic.media_item(scene))    # (4N, 1176) pixel rows, (1, 3)
        tokens = model.visual(rows.to(weight.device, weight.dtype), grid.to(weight.device))      # (N, C)
        out.append(F.rms_norm(tokens.float().cpu(), (model.config.text.hidden_size,)))
    return out


def lookups(scenes, key: str, read: str) -> list[tuple[int, int, int, float]]:
    """(scene index, class of the naming value, class of the answer, chance) for every shape whose `key`
    value is unique in its scene; chance = 1 / the number of different answers among the scene's shapes."""
    out = []
    for i, scene in enumerate(scenes):
        keys, reads = [getattr(s, key) for s in scene.shapes], {getattr(s, read) for s in scene.shapes}
        out += [(i, VALUES[key].index(getattr(s, key)), VALUES[read].index(getattr(s, read)), 1 / len(reads))
                for s in scene.shapes if keys.count(getattr(s, key)) == 1]
    return out


class AttentionProbe(torch.nn.Module):
    """One attention head: query = a learned vector for the naming value, keys = a linear map of the tokens,
    output = a linear read-out of the attention-weighted mean token."""

    def __init__(self, hidden: int, n_keys: int, n_answers: int, dim: int = 32):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(n_keys, dim) * 0.1)        # (values, D)
        self.key = torch.nn.Linear(hidden, dim, bias=False)
        self.read = torch.nn.Linear(hidden, n_answers)

    def forward(self, tokens: torch.Tensor, value: int) -> torch.Tensor:      # tokens (N, C) -> (answers,)
        weights = torch.softmax(self.key(tokens) @ self.query[value], 0)      # (N,): where the named shape is
        return self.read(weights @ tokens)                                    # (C,) -> (answers,) logits


def train_probe(tokens, examples, key: str, read: str, epochs: int = 2, batch: int = 32, seed: int = 0):
    """Fit a probe on `examples` (from `lookups`) over the scenes' `tokens`."""
    with torch.random.fork_rng():                       # seeded, without moving the caller's random state
        torch.manual_seed(seed)
        head = AttentionProbe(tokens[0].shape[1], len(VALUES[key]), len(VALUES[read]))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    order = list(examples)
    for epoch in range(epochs):
        random.Random(f"{seed}-{epoch}").shuffle(order)
        for i in range(0, len(order), batch):
            chunk = order[i:i + batch]
            logits = torch.stack([head(tokens[s], v) for s, v, _, _ in chunk])                  # (b, answers)
            loss = F.cross_entropy(logits, torch.tensor([a for _, _, a, _ in chunk]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


def probe(model, processor, n: int = 800, seed: int = 0, epochs: int = 2) -> dict:
    """Both look-ups on `n` fresh two- and three-shape scenes (four in five train the probe, the rest score it):
    {"kind->color": {"accuracy", "chance", "held_out"}, "color->kind": {...}, "scenes", "train_scenes", "epochs"}."""
    rng = random.Random(f"probe-{seed}")
    scenes = [synthetic.draw_scene(rng, n_shapes=rng.choice((2, 3))) for _ in range(n)]
    tokens = visual_tokens(model, processor, scenes)
    cut = int(0.8 * n)                                  # split by scene: no held-out scene was seen in training
    out = {"scenes": n, "train_scenes": cut, "epochs": epochs}
    for key, read in LOOKUPS:
        examples = lookups(scenes, key, read)
        fitted = train_probe(tokens, [e for e in examples if e[0] < cut], key, read, epochs, seed=seed)
        held = [e for e in examples if e[0] >= cut]
        if not held:
            raise ValueError(f"probe: n={n} scenes leave no held-out {key}->{read} look-up; use n >= 50")
        with torch.no_grad():
            right = [fitted(tokens[s], v).argmax().item() == a for s, v, a, _ in held]
        out[f"{key}->{read}"] = {"accuracy": sum(right) / len(held), "chance": sum(e[3] for e in held) / len(held),
                                 "held_out": len(held)}
    return out


class RandomViT(torch.nn.Module):
    """The probe's control: `model`'s ViT + merger architecture, freshly initialised (seeded), with no LLM
    beside it (for a 7B model that would be 28 GB for nothing)."""

    def __init__(self, model):
        super().__init__()
        from qwen2vl_min.vision import VisionTransformer
        from .train import init_weights
        self.config = model.config
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.visual = init_weights(VisionTransformer(model.config.vision))
        self.to(next(model.parameters()).device).eval()


def measure(model, processor, n: int = 800) -> dict:
    """{"model": probe of `model`, "random_vit": the same probe on a random ViT} (what training/probe.json holds)."""
    return {"model": probe(model, processor, n), "random_vit": probe(RandomViT(model), processor, n)}


def save(ckpt, result: dict) -> Path:
    path = Path(ckpt) / "training" / "probe.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.probe", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped nano model)")
    p.add_argument("-n", type=int, default=800, help="scenes (four in five train the probe)")
    p.add_argument("--write", action="store_true", help="save training/probe.json and rewrite the card")
    a = p.parse_args(argv)
    from .train import NANO_DIR
    ckpt = Path(a.model or NANO_DIR)
    if a.write and not (ckpt / "training" / "log.json").is_file():
        p.error(f"--write adds to the card of a checkpoint trained by `python -m lab.train`; {ckpt} has no "
                "training/log.json (leave out --write to only print the result)")
    model, processor = q.load(ckpt)
    result = measure(model, processor, a.n)
    for look in ("kind->color", "color->kind"):
        m, r = result["model"][look], result["random_vit"][look]
        print(f"{look}: {m['accuracy']:.1%} on the model's visual tokens, {r['accuracy']:.1%} on a random ViT's "
              f"(guessing among the scene's shapes: {m['chance']:.1%}; {m['held_out']} held-out look-ups)")
    if a.write:
        from .card import write_card
        print("wrote", save(ckpt, result), "and", write_card(ckpt))


if __name__ == "__main__":
    main()
