"""The nano model's card (checkpoints/qwen2vl-nano/README.md), written from its training log.

`python -m lab.card` rewrites it from training/log.json (and training/failures.json and training/ablation.json
when the failure analysis and the position ablation have been run), so the numbers in the card are always the
measured ones.
"""
import json
import platform
import sys
from pathlib import Path

import torch

from .evaluate import NAMED, TARGETS, table
from .train import NANO_DIR, STAGES


CHANCE = {"position": 1 / 9, "video_direction": 1 / 4}     # 9 regions, 4 directions


def percent(x: float) -> str:
    """0.525 -> "52.5%", 0.9 -> "90%": one decimal where it has one (":.0%" would print 52.5 % as "52%")."""
    return f"{x:.1%}".replace(".0%", "%")


def ablation_reading(a: dict) -> str:
    """The ablation's result in words, from its numbers: did M-RoPE help where it should (where things are
    and which way they move), and were the two models above chance at all?"""
    m, d = a["mrope"], a["1d"]
    facts = ", ".join(f"{c.replace('_', ' ')} {percent(m[c])} with M-RoPE vs {percent(d[c])} with 1D positions "
                      f"(chance {percent(CHANCE[c])})" for c in CHANCE)
    gain = max(m[c] - d[c] for c in CHANCE)
    loss = max(d[c] - m[c] for c in CHANCE)
    verdict = ("M-RoPE helped." if gain > 0.05 and loss <= 0.05 else
               "M-RoPE did not help in this run; 1D positions did as well or better." if gain <= 0.05 else
               "The result is mixed.")
    near_chance = all(max(m[c], d[c]) < CHANCE[c] + 0.15 for c in CHANCE)
    caveat = (" Both models stay within 15 points of chance on these two questions, so this short run cannot "
              "show the benefit the paper reports; it measures how little spatial skill a short CPU run learns, "
              "with either position scheme." if near_chance else "")
    if min(m["video_direction"], d["video_direction"]) >= TARGETS["video_direction"]:
        caveat += (" Both read the direction of motion well: the ViT sees it in the two frames of each temporal"
                   " patch (its warm-up labels motion), which both variants share, so in this recipe the ablation tests"
                   " the LLM's position ids on where things are, not on which way they move.")
    return f"{facts}. {verdict}{caveat}"


def failure_lines(f: dict, asked: str) -> list[str]:
    """The card's "where it fails" section from `lab.evaluate.failures` (+ "n"): a table by number of shapes
    beside what guessing among the scene's shapes would score, then what the numbers say, in words.
    `asked` names the questions after their number ("held-out questions per category")."""
    by = f["by_shapes"]
    counts = sorted({int(k) for table in by.values() for k in table})
    head = "| question | " + " | ".join(f"{k} shape{'s' * (k != 1)}" for k in counts) + " |"
    rows = [head, "|---|" + "---|" * len(counts)]
    for cat, table in by.items():
        cells = [f"{table[str(k)][0]}/{table[str(k)][1]} ({table[str(k)][0] / table[str(k)][1]:.0%})"
                 if str(k) in table else "" for k in counts]
        rows.append(f"| {cat} | " + " | ".join(cells) + " |")
    guess = [f"{1 / k:.0%}" if k else "" for k in counts]
    rows.append("| color or shape: a guess among the scene's shapes | " + " | ".join(guess) + " |")
    words = []
    for cat, (named, wrong) in f["names_another"].items():
        what = "colour" if NAMED[cat] == "color" else NAMED[cat]          # the Shape attribute, in the card's words
        one, many = by[cat].get("1"), [by[cat][k] for k in ("2", "3") if k in by[cat]]
        if wrong:
            answers = "answer names" if wrong == 1 else f"answers {'names' if named == 1 else 'name'}"
            words.append(f"{named} of the {wrong} wrong {cat} {answers} the {what} of another shape in the scene.")
        if one and many and one[0] / one[1] >= 0.9 and sum(r for r, _ in many) / sum(n for _, n in many) < 0.8 \
                and wrong and named >= 0.8 * wrong:
            words.append(f"Asked about one shape, the model is right {one[0] / one[1]:.0%} of the time; with more "
                         f"shapes it names another shape's {what}: it sees the objects but does not bind "
                         "the question to the right one (the binding problem).")
    parts = f.get("position_parts")
    if parts:
        words.append(f"Position answers have a row part (top / middle / bottom) and a column part (left / center / "
                     f"right): the row part is right {parts['row']:.0%} of the time, the column part "
                     f"{parts['column']:.0%} (chance 33% each).")
    return [f"{f['n']} {asked}, split by the number of shapes in the scene (right/asked; a number scene may have "
            "no shapes):", "", *rows, "", " ".join(words)]


def probe_lines(p: dict, f: dict | None) -> list[str]:
    """The card's probe section from `lab.probe` (training/probe.json): each look-up on the model's visual
    tokens and on a random ViT's, beside the LLM's own answers to the same question on two- and three-shape
    scenes (from the failure analysis `f`, if saved), then what that says."""
    from .synthetic import TEMPLATES
    category = {attribute: cat for cat, attribute in NAMED.items()}     # the attribute asked -> its question
    rows = ["| look-up | the question it answers | probe on the nano's visual tokens | probe on a random ViT's | "
            "guess among the scene's shapes | the LLM, 2-3 shapes |", "|---|---|---|---|---|---|"]
    llm, question = {}, {}
    for look in ("kind->color", "color->kind"):
        m, r = p["model"][look], p["random_vit"][look]
        cat = category[look.split("->")[1]]
        question[look] = TEMPLATES[cat][0]                              # the exact phrasing the evaluation asks
        by = (f or {}).get("by_shapes", {}).get(cat, {})
        many = [by[k] for k in ("2", "3") if k in by]
        if many:
            llm[look] = sum(right for right, _ in many) / sum(asked for _, asked in many)
        rows.append(f"| {look.replace('->', ' -> ')} | \"{question[look]}\" | {m['accuracy']:.1%} | "
                    f"{r['accuracy']:.1%} | {m['chance']:.0%} | " + (f"{llm[look]:.0%}" if look in llm else "") + " |")
    m = p["model"]
    words = [f"One attention head trained for {m['epochs']} passes over {m['train_scenes']} scenes on the frozen "
             f"visual tokens, scored on {m['scenes'] - m['train_scenes']} others."]
    k2c, c2k = m["kind->color"]["accuracy"], m["color->kind"]["accuracy"]
    if min(k2c, c2k) >= 0.95 and "kind->color" in llm and llm["kind->color"] < 0.8:
        words.append(f"The tokens hold the answer: one head finds the named shape and reads its colour "
                     f"{k2c:.0%} of the time (a random ViT gives it nothing to find), while the LLM answers "
                     f"\"{question['kind->color']}\" right {llm['kind->color']:.0%} of the time when other shapes "
                     f"are present. What is missing is the LLM's look-up of a shape by its kind, not the ViT's "
                     f"features.")
        if "color->kind" in llm:
            words.append(f"By colour it does look shapes up ({llm['color->kind']:.0%} right)." if
                         llm["color->kind"] >= 0.8 else
                         f"It does not look shapes up by colour either ({llm['color->kind']:.0%} right).")
    elif min(k2c, c2k) >= 0.9 and len(llm) == 2 and min(llm.values()) >= 0.8:
        words.append(f"The tokens hold the answer and the LLM finds it: with other shapes present it answers "
                     f"\"{question['kind->color']}\" right {llm['kind->color']:.0%} of the time and "
                     f"\"{question['color->kind']}\" {llm['color->kind']:.0%}.")
    return rows + ["", " ".join(words)]


def loss_on(stage) -> str:
    """A stage's losses in words: its chats' tokens, plus the cell-label loss on `cells` scenes per step and the
    grounding heads' and the pointing heads' losses (stage 3's look-ups)."""
    if stage.loss_on == "cells":
        return f"cells ({stage.cells} scenes/step)"
    return (stage.loss_on + (f" + cells ({stage.cells} scenes/step)" if stage.cells else "")
            + (f" + pooled digits ({stage.pooled:g})" if stage.pooled else "")
            + (" + grounding" if stage.ground else "") + (" + pointing" if stage.point else ""))


def write_card(ckpt: Path = NANO_DIR) -> Path:
    ckpt = Path(ckpt)
    log = json.loads((ckpt / "training" / "log.json").read_text())
    s, cfg = log["summary"], json.loads((ckpt / "config.json").read_text())
    ablation_file = ckpt / "training" / "ablation.json"
    ablation = json.loads(ablation_file.read_text()) if ablation_file.exists() else None
    size_mb = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e6
    stages = "\n".join(f"| {st.name} | {round(st.steps * s['scale'])} | {st.lr:g} | {', '.join(st.train)} | "
                       f"{loss_on(st)} | {s['stage_seconds'].get(st.name, 0)} s |" for st in STAGES)
    ev = s.get("evaluation")
    lines = [
        "# Qwen2-VL-nano: the lab's own Qwen2-VL",
        "",
        "A real Qwen2-VL with the same architecture and code path as Qwen2-VL-2B/7B/72B (14 px patches, temporal",
        "patch 2, 2D RoPE ViT, 2x2 patch merger, M-RoPE, ChatML), only small. It was trained from scratch in this",
        "repository on a procedurally generated world of shapes, numbers and moving-shape videos (`lab/synthetic.py`).",
        "It is the default model of the lab's notebooks, app and command line.",
        "",
        f"- parameters: {s['parameters']:,}; checkpoint size {size_mb:.1f} MB (fp32 safetensors)",
        f"- ViT: depth {cfg['vision_config']['depth']}, width {cfg['vision_config']['embed_dim']}, "
        f"{cfg['vision_config']['num_heads']} heads; LLM: {cfg['num_hidden_layers']} layers x {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} key-value heads, head_dim 32, "
        f"mrope_section {cfg['rope_scaling']['mrope_section']}, rope_theta {cfg['rope_theta']:g}, "
        f"vocabulary {cfg['vocab_size']} (byte-level BPE)",
        "- images are capped at 64 visual tokens (`max_pixels` 50,176), video frames at 16 tokens per temporal patch",
        "",
        "## Recipe (`python -m lab.train`)",
        "",
        f"Seed {s['seed']}, global batch {s['batch_size']}, AdamW, warm-up then cosine decay per stage; "
        f"{s['train_seconds'] / 60:.1f} min on {s['device']} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {s['world_size']} process(es)).",
        "",
        "| stage | steps | peak lr | trained | loss on | time |",
        "|---|---|---|---|---|---|",
        stages,
        "",
        "The two stage-0 rows stand in for the paper's starting points. Qwen2-VL's LLM starts from Qwen2: here",
        "the LLM learns the world's language from text-only chats. Its ViT starts from DFN's pretrained ViT: here",
        "the ViT + merger learn to name, under every merged token, the kind and colour of the shape, the written",
        "digit and its place in the number, in clips the way the shape moves, and how many shapes the picture",
        "holds (all, and of the token's own kind): seven linear heads on dense labels from the generator",
        "(`lab.train.cell_labels`; counting is hard for the LLM's attention, which averages, and the ViT sees",
        "the whole picture at once). The heads stay on as an auxiliary loss in stages 1 and 2 (\"+ cells\": a",
        "few scenes or clips per step), so that the LLM's gradients do not wash these features out of the ViT;",
        "they are thrown away at the end and are not part of the checkpoint. From stage 1 on, the digit head is",
        "also asked once per written digit, on the mean of its tokens (\"pooled\"): a glyph spans many tokens,",
        "each of which sees only a stroke of it. It starts after the warm-up because with it from the start the",
        "ViT never learned which digit of the number a token shows (first, second, third).",
        "The other three are the paper's: ViT + merger with the LLM frozen on captions; everything on the mixed",
        "data (captions, questions, numbers, videos, two-image prompts, text-only); instruction tuning with the ViT",
        "frozen and the loss on the assistant's tokens only. Loss curves: `training/loss_curves.png`.",
        "",
    ]
    if any(st.ground or st.point for st in STAGES):
        lines += ["\"+ grounding\" and \"+ pointing\" teach the LLM to look a named object up (the binding problem)",
                  "and to say where it is. Grounding heads on the LLM's hidden states ask, at each word that names one",
                  "object of the picture (\"circle\", \"red\"), for what the word does not say of it and for its region,",
                  "at a plural (\"circles\", \"shapes\") for how many, at every visual token for its row and column in",
                  "the image's grid (and its kind and colour), at \"circle\" in \"the red circle\" for the colour before",
                  "it, and where an answer's colour, kind, count or region is predicted, for it",
                  "(`lab.train.ground_labels`).",
                  "Attention heads are taught to point (`lab.train.point_targets`): in layer 0 from such a word (or a",
                  "plural) to the objects' visual tokens, in layer 1 from the word to them again (now they know where",
                  "they sit; \"circle\" in \"the red circle\" to the red one only; each token by how much of it the",
                  "shape covers, so that the average of their rows and columns is the shape's centre) and to the",
                  "image's last token (it knows the grid's size), and in layers 1 and 2 from every word of the answer",
                  "to the question's word. To read a written number, each digit of the answer looks, in layer 0, at",
                  "the token before it (a digit there means it is the second or third) and, in layer 2, at the",
                  "visual tokens of the written digit in that place (a grounding head asks every visual token which",
                  "digit of the number it shows).",
                  "Why the rows and columns: the ViT cannot know where anything is",
                  "(no absolute position embedding, and on a plain background every background patch is the same);",
                  "only M-RoPE gives a visual token its row and column, in the LLM. The grounding heads are thrown",
                  "away with the cell heads and the pointing heads are the LLM's own, so the checkpoint is a plain",
                  "Qwen2-VL.", ""]
    if s.get("cell_accuracy"):
        acc = ", ".join(f"{name} {a:.0%}" for name, a in s["cell_accuracy"].items())
        lines += ["After training, the ViT and the cell heads name what lies under the merged tokens of fresh scenes",
                  "and clips (accuracy over the cells that hold something):", "", f"{acc}.", "",
                  "This is what the ViT sees; the evaluation below measures how much of it the LLM has learned to use.",
                  ""]
    if ev:
        n = s.get("evaluation_n", 200)
        lines += ["## Evaluation (`python -m lab.evaluate`)", "",
                  f"{n} held-out questions per category, drawn with a seed no training run uses, asked with the",
                  "exact phrasings of the specification; exact match of the answer word, greedy decoding.", "",
                  table(ev), ""]
        missed = [c for c in TARGETS if ev.get(c, 0) < TARGETS[c]]
        lines += [f"Below target: {', '.join(missed)}." if missed else "Every category meets its target.", ""]
    failures_file, probe_file = ckpt / "training" / "failures.json", ckpt / "training" / "probe.json"
    f = json.loads(failures_file.read_text()) if failures_file.exists() else None
    if f:
        same = f.get("scores") == ev and f["n"] == s.get("evaluation_n")     # one run: the table's own answers
        lines += ["## Where it fails (`python -m lab.evaluate --failures`)", "",
                  *failure_lines(f, "held-out questions per category, " + (
                      "the answers of the table above" if same else "a separate run of the evaluation")), ""]
    if probe_file.exists():
        lines += ["## Is the answer in the visual tokens? (`python -m lab.probe`)", "",
                  *probe_lines(json.loads(probe_file.read_text()), f), ""]
    if ablation:
        lines += ["## Ablation: M-RoPE vs plain 1D positions (`python -m lab.train --ablation`)", "",
                  ablation.get("how") or f"Both retrained with the same shorter schedule (scale "
                                         f"{ablation['scale']}, seed {ablation['seed']});",
                  "the 1D run sets all three position rows to the token index, everything else equal.", "",
                  table(ablation["mrope"], ablation["1d"], "1D positions").replace("| accuracy |",
                                                                                  "| M-RoPE |"),
                  "", ablation.get("note") or ablation_reading(ablation), ""]
    lines += ["## Limits", "",
              "- It knows only its world: circles, squares and triangles in six colours on light backgrounds,",
              "  numbers 0-999, one shape moving in a short clip. On real photos its answers are guesses in",
              "  that vocabulary; questions outside the world get a fixed polite refusal.",
              "- English only, short answers, at most 1,024 tokens of context.",
              "- Attention maps of a model this small are a teaching aid, not an explanation.", "",
              "## Use", "",
              "```python", "import qwen2vl_min as q", "model, processor = q.load(\"checkpoints/qwen2vl-nano\")",
              "```", "",
              "transformers' `Qwen2VLForConditionalGeneration.from_pretrained(\"checkpoints/qwen2vl-nano\")` loads",
              "the same weights and gives the same logits (`tests/test_nano.py`).", "",
              f"Written by `python -m lab.card` (Python {sys.version.split()[0]}, torch {torch.__version__}).", ""]
    path = ckpt / "README.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    print(write_card(Path(sys.argv[1]) if len(sys.argv) > 1 else NANO_DIR))
