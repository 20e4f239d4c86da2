"""The shipped nano model: complete, small, loads offline in ours and in transformers with equal logits,
answers its world's questions (the card's held-out evaluation against its bars, a smaller sample against the
card's table), and talks sensibly without images."""
import json
import random
import subprocess
import sys

import pytest
import torch

import qwen2vl_min as q
from helpers import mm_token_type_ids
from lab import synthetic
from lab.evaluate import TARGETS, evaluate, normalise
from lab.train import NANO_DIR

if not (NANO_DIR / "model.safetensors").exists():
    pytest.skip("checkpoints/qwen2vl-nano has not been trained and committed yet (the nano-model issue is open); "
                "`python -m lab.train` writes it", allow_module_level=True)

FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
         "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def nano():
    return q.load(NANO_DIR, device="cpu")


def test_checkpoint_is_complete_and_small():
    for name in FILES:
        assert (NANO_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in NANO_DIR.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"{total / 2**20:.1f} MiB"


def _prompt(processor):
    rng = random.Random(5)
    scene, clip = synthetic.draw_scene(rng), synthetic.draw_clip(rng)
    return processor([{"role": "user", "content": [
        {"type": "image", "image": scene.image}, {"type": "video", "video": list(clip.frames)},
        {"type": "text", "text": "What color is the moving shape?"}]}])


def test_transformers_loads_it_offline_with_the_same_logits(nano, monkeypatch):
    from transformers import Qwen2VLForConditionalGeneration
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = nano
    hf = Qwen2VLForConditionalGeneration.from_pretrained(NANO_DIR, attn_implementation="eager").eval()
    b = _prompt(processor)
    cfg = json.loads((NANO_DIR / "config.json").read_text())
    with torch.no_grad():
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                    image_grid_thw=b.image_grid_thw, pixel_values_videos=b.pixel_values_videos,
                    video_grid_thw=b.video_grid_thw, mm_token_type_ids=mm_token_type_ids(b.input_ids, cfg)).logits
        ours = model(b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw, b.pixel_values_videos,
                     b.video_grid_thw)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # The special ids come from the checkpoint, not transformers' Qwen defaults (151643/151645, outside vocab 832).
    assert (hf.config.text_config.bos_token_id, hf.config.text_config.eos_token_id) == \
        (processor.pad_token_id, processor.eos_token_ids[0])


@pytest.fixture(scope="module")
def sample(nano):
    """A smaller sample (48 per category) of the card's held-out evaluation."""
    return evaluate(*nano, n=48, show=False)


@pytest.fixture(scope="module")
def held_out(nano):
    """The card's whole held-out evaluation: 200 questions per category, the size its bars are set on."""
    return evaluate(*nano, n=200, show=False)


def test_held_out_sample_agrees_with_the_card(sample):
    """The checkpoint performs as its card says (within 3 binomial standard errors + 5 points)."""
    card = json.loads((NANO_DIR / "training" / "log.json").read_text())["summary"]["evaluation"]
    for cat, score in sample.items():
        sigma = (card[cat] * (1 - card[cat]) / 48) ** 0.5
        assert abs(score - card[cat]) <= 3 * sigma + 0.05, (cat, score, card[cat])


def test_held_out_evaluation_meets_the_bars(held_out):
    """Every category at or above its target on 200 questions. (Not on the 48-question sample: a model 2 points
    above a 90 % bar, as the shipped one is on position, falls below it in a sample that small one time in three;
    the first 48 position questions get 43 right, 89.6 %.)"""
    missed = {c: s for c, s in held_out.items() if s < TARGETS[c]}
    assert not missed, f"below target: {missed} (all: {held_out})"


def _reply(model, processor, text):
    batch = processor([{"role": "user", "content": text}])
    return "".join(q.stream_text(processor, q.generate(model, batch, max_new_tokens=60)))


def test_text_only_turns_are_honest(nano):
    model, processor = nano
    assert _reply(model, processor, "Hello!") == synthetic.GREETING_ANSWER
    assert _reply(model, processor, "What can you do?") == synthetic.CAN_DO
    assert _reply(model, processor, "What is the capital of France?") == synthetic.REFUSAL


def test_card_shows_the_measured_evaluation():
    card = (NANO_DIR / "README.md").read_text()
    log = json.loads((NANO_DIR / "training" / "log.json").read_text())["summary"]
    for cat, score in log["evaluation"].items():
        assert f"| {cat} | {score:.1%} |" in card
    assert (NANO_DIR / "training" / "loss_curves.png").is_file()


def test_command_line_defaults_to_the_nano_model(tmp_path):
    scene = synthetic.draw_scene(random.Random(11), n_shapes=1)
    scene.image.save(tmp_path / "scene.png")
    r = subprocess.run([sys.executable, "-m", "qwen2vl_min", "--image", str(tmp_path / "scene.png"),
                        "--prompt", f"What color is the {scene.shapes[0].kind}?"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert normalise(r.stdout) == scene.shapes[0].color
