"""The failure analysis (lab.evaluate.failures): answers split by the number of shapes in the scene, wrong answers
that name another object of the scene, position answers split into row and column; and the card's section."""
import json
import random
import shutil

from lab import card, evaluate as ev, synthetic
from lab.train import NANO_DIR


def _examples(category, n=60, seed=4):
    rng = random.Random(seed)
    return [synthetic.make_example(rng, category, exact=1.0) for _ in range(n)]


def _binding_errors(examples):
    """A model that is right about a lone shape and names another shape's colour when there are several."""
    out = []
    for ex in examples:
        shapes = ex["world"][0].shapes
        others = [s.color for s in shapes if f"{s.color}." != ex["answer"]]
        out.append((ex, f"{others[0]}." if len(shapes) > 1 and others else ex["answer"]))
    return out


def test_binding_errors_show_up_by_number_of_shapes():
    answered = {"color": _binding_errors(_examples("color"))}
    f = ev.failures(answered)
    sizes = [len(ex["world"][0].shapes) for ex, _ in answered["color"]]
    wrong = sum(not ev.right(ex, got) for ex, got in answered["color"])
    assert {int(k) for k in f["by_shapes"]["color"]} == set(sizes) and len(set(sizes)) == 3
    assert f["by_shapes"]["color"]["1"] == [sizes.count(1), sizes.count(1)]        # a lone shape: always right
    assert f["by_shapes"]["color"]["3"][1] == sizes.count(3)
    assert 0 < wrong and f["names_another"]["color"] == [wrong, wrong]            # every error names another shape
    assert ev.scores(answered)["color"] == (len(sizes) - wrong) / len(sizes)


def test_a_colour_absent_from_the_scene_is_not_counted_as_naming_another_shape():
    examples = _examples("color", 30)
    absent = [next(c for c in synthetic.COLORS if c not in {s.color for s in ex["world"][0].shapes})
              for ex in examples]
    f = ev.failures({"color": [(ex, f"{c}.") for ex, c in zip(examples, absent)]})
    assert f["names_another"]["color"] == [0, 30]
    assert sum(right for right, _ in f["by_shapes"]["color"].values()) == 0


def test_position_answers_split_into_row_and_column():
    assert ev.row_and_column("Top left.") == ("top", "left")
    assert ev.row_and_column("bottom") == ("bottom", "center")
    assert ev.row_and_column("right.") == ("middle", "right")
    assert ev.row_and_column("center.") == ("middle", "center")
    examples = _examples("position", 40)
    # answer every question with the right row and always "left" as the column
    got = [" ".join(w for w in (ev.row_and_column(ex["answer"])[0], "left") if w != "middle") for ex in examples]
    f = ev.failures({"position": list(zip(examples, got))})
    left = sum(ev.row_and_column(ex["answer"])[1] == "left" for ex in examples)
    assert f["position_parts"] == {"row": 1.0, "column": left / len(examples)}
    assert 0 < left < len(examples)


def test_the_card_shows_the_saved_failure_analysis(tmp_path):
    ckpt = tmp_path / "nano"
    (ckpt / "training").mkdir(parents=True)
    for name in ("config.json", "training/log.json"):
        shutil.copy(NANO_DIR / name, ckpt / name)
    answered = {"color": _binding_errors(_examples("color")), "position": list(zip(_examples("position", 60),
                                                                                   ["top."] * 60))}
    saved = json.loads(ev.save_failures(ckpt, answered).read_text())
    assert saved["n"] == 60 and saved["scores"] == ev.scores(answered)
    text = card.write_card(ckpt).read_text()
    section = text.split("## Where it fails")[1].split("\n## ")[0]
    right, asked = saved["by_shapes"]["color"]["3"]
    assert "| color |" in section and f"{right}/{asked} ({right / asked:.0%})" in section
    assert "does not bind the question to the right one" in section
    assert "a separate run of the evaluation" in section          # 60 questions here, 200 in the copied log
    assert f"the row part is right {saved['position_parts']['row']:.0%}" in section


def _probe_result(kind_to_color, color_to_kind):
    look = lambda acc, chance: {"accuracy": acc, "chance": chance, "held_out": 200}
    size = {"scenes": 800, "train_scenes": 640, "epochs": 2}
    return {"model": {**size, "kind->color": look(kind_to_color, 0.5), "color->kind": look(color_to_kind, 0.58)},
            "random_vit": {**size, "kind->color": look(0.48, 0.5), "color->kind": look(0.43, 0.58)}}


def _probe_section(ckpt):
    """The card's probe section, rewritten from what ckpt/training holds now."""
    return card.write_card(ckpt).read_text().split("## Is the answer in the visual tokens?")[1].split("\n## ")[0]


def test_the_card_sets_the_probe_beside_the_llm_s_own_answers(tmp_path):
    """The probe section reads training/probe.json and the failure analysis: the LLM's column is its score on
    two- and three-shape scenes, and the verdict "the tokens hold the answer" needs a probe that finds it."""
    ckpt = tmp_path / "nano"
    (ckpt / "training").mkdir(parents=True)
    for name in ("config.json", "training/log.json"):
        shutil.copy(NANO_DIR / name, ckpt / name)
    shape = _examples("shape")
    saved = json.loads(ev.save_failures(ckpt, {"color": _binding_errors(_examples("color")),
                                               "shape": [(ex, ex["answer"]) for ex in shape]}).read_text())
    many = [saved["by_shapes"]["color"][k] for k in ("2", "3") if k in saved["by_shapes"]["color"]]
    llm = sum(r for r, _ in many) / sum(n for _, n in many)
    assert llm < 0.8
    from lab import probe
    probe.save(ckpt, _probe_result(0.99, 1.0))
    section = _probe_section(ckpt)
    assert "| kind -> color | \"What color is the {shape}?\" | 99.0% | 48.0% | 50% | " + f"{llm:.0%} |" in section
    assert "The tokens hold the answer" in section and "look-up of a shape by its kind" in section
    assert "trained for 2 passes over 640 scenes" in section and "scored on 160 others" in section
    assert "By colour it does look shapes up (100% right)." in section              # every shape answer right
    ev.save_failures(ckpt, {"color": _binding_errors(_examples("color")), "shape": [(ex, "circle.") for ex in shape]})
    section = _probe_section(ckpt)
    assert "It does not look shapes up by colour either" in section
    ev.save_failures(ckpt, {"color": [(ex, ex["answer"]) for ex in _examples("color")],
                            "shape": [(ex, ex["answer"]) for ex in shape]})      # a model that binds
    section = _probe_section(ckpt)
    assert "the LLM finds it: with other shapes present it answers \"What color is the {shape}?\" right 100%" in section
    assert "What is missing" not in section
    probe.save(ckpt, _probe_result(0.6, 1.0))                     # a probe that does not find it: no verdict
    section = _probe_section(ckpt)
    assert "| 60.0% |" in section and "The tokens hold the answer" not in section


def test_the_ablation_reading_keeps_the_half_points_of_its_numbers():
    """The card's ablation sentence gives each accuracy as the table does: 52.5 % is "52.5%", not "52%" (the
    ":.0%" format rounds half to even), and a whole number stays whole; the verdict follows the gap."""
    reading = card.ablation_reading({"mrope": {"position": 0.9, "video_direction": 0.985},
                                     "1d": {"position": 0.525, "video_direction": 0.99}})
    assert reading.startswith("position 90% with M-RoPE vs 52.5% with 1D positions (chance 11.1%), "
                              "video direction 98.5% with M-RoPE vs 99% with 1D positions (chance 25%). M-RoPE helped.")
    same = card.ablation_reading({"mrope": {"position": 0.5, "video_direction": 0.5},
                                  "1d": {"position": 0.5, "video_direction": 0.5}})
    assert "M-RoPE did not help in this run" in same
