"""lab.probe: one attention head on the frozen visual tokens finds a named shape and reads another attribute
of it on the shipped nano model, and cannot on a random ViT (the control that makes the first number mean
something)."""
import random

import pytest

import qwen2vl_min as q
from lab import probe, synthetic
from lab.train import NANO_DIR


@pytest.fixture(scope="module")
def nano():
    model, processor = q.load(NANO_DIR)
    return model.eval(), processor


def test_lookups_ask_only_about_shapes_their_attribute_names_alone():
    rng = random.Random(4)
    scenes = [synthetic.draw_scene(rng, n_shapes=3) for _ in range(50)]
    for key, read in probe.LOOKUPS:
        for s, value, answer, chance in probe.lookups(scenes, key, read):
            named = [x for x in scenes[s].shapes if getattr(x, key) == probe.VALUES[key][value]]
            assert len(named) == 1 and getattr(named[0], read) == probe.VALUES[read][answer]
            assert chance == 1 / len({getattr(x, read) for x in scenes[s].shapes})
    two_circles = synthetic.Scene(scenes[0].image, tuple(synthetic.Shape("circle", c, "top", (0, 0, 9, 9))
                                                         for c in ("red", "blue")), None)
    assert probe.lookups([two_circles], "kind", "color") == []        # "the circle" would name two shapes
    assert len(probe.lookups([two_circles], "color", "kind")) == 2


def test_the_nano_visual_tokens_hold_the_named_shape_s_colour_and_a_random_vit_s_do_not(nano):
    model, processor = nano
    # the card's size (lab.probe.measure: 800 scenes, 640 to train on): at 300 the probe trains on 240 scenes and
    # scores 72, and on the shipped model it read the colour of 64 of them (88.9 %; 97.8 % at the card's size)
    found = probe.probe(model, processor, n=800)
    control = probe.probe(probe.RandomViT(model), processor, n=800)
    for look in ("kind->color", "color->kind"):
        assert found[look]["held_out"] >= 50
        assert found[look]["accuracy"] >= 0.9, found
        assert control[look]["accuracy"] <= found[look]["chance"] + 0.15, control     # guessing, at best
