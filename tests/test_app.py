"""The app on the shipped nano model: event handlers called directly, then the real server driven through
gradio_client. Every answer is checked twice: it is the right answer about its picture, and it is exactly
what `generate` gives for that input (so a mix-up between concurrent sessions cannot pass)."""
import concurrent.futures as cf
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gradio as gr
import qwen2vl_min as q
from helpers import random_image
from lab import synthetic, ui
from lab.examples import EXAMPLES, write_clip
from lab.train import NANO_DIR

if not (NANO_DIR / "model.safetensors").exists():
    pytest.skip("checkpoints/qwen2vl-nano has not been trained and committed yet; `python -m lab.train` writes it",
                allow_module_level=True)

N_NEW = 12
COLORS = ("red", "blue", "green", "yellow")


@pytest.fixture(scope="module")
def tiny():
    return q.load(NANO_DIR, device="cpu")


@pytest.fixture(scope="module")
def lab(tiny):
    return ui.Lab(*tiny, max_new_tokens=N_NEW)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    out = {}
    seed = 0
    for i, color in enumerate(COLORS):        # one big circle each, a different colour each
        while True:
            scene = synthetic.draw_scene(random.Random(seed), n_shapes=1, size=(168 + 28 * i, 196))
            seed += 1
            if (scene.shapes[0].kind, scene.shapes[0].color) == ("circle", color):
                break
        out[f"img{i}"] = d / f"img{i}.png"
        scene.image.save(out[f"img{i}"])
    out["text"] = d / "notes.txt"
    out["text"].write_text("not a picture")
    out["empty"] = d / "empty.png"
    out["empty"].write_bytes(b"")
    out["truncated"] = d / "truncated.png"
    out["truncated"].write_bytes(out["img0"].read_bytes()[:200])
    out["bad_video"] = d / "broken.mp4"
    out["bad_video"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    out["thin"] = d / "thin.png"
    Image.new("RGB", (3000, 10), (200, 30, 30)).save(out["thin"])
    out["bomb"] = d / "bomb.png"
    Image.new("RGB", (400, 400), (250, 250, 250)).save(out["bomb"])
    out["long"] = d / "long.mp4"       # 60 s at 4 fps: more frames than the video budget allows
    write_clip([random_image(64, 48, seed=i % 7) for i in range(240)], out["long"], fps=4)
    return out


def expected(tiny, content, n=N_NEW):
    model, processor = tiny
    batch = processor([{"role": "user", "content": content}])
    return processor.decode(list(q.generate(model, batch, n)))


def image_question(path, text="What color is the circle?"):
    return [{"type": "image", "image": str(path)}, {"type": "text", "text": text}]


def final(lab, message, history=(), session=None):
    out = list(lab.respond(message, list(history), N_NEW, 0.0, 1.0, session))
    return out[-1]


# ---------------------------------------------------------------- plain handlers
def test_history_shapes_from_browser_and_client_normalise_the_same(files):
    p = str(files["img0"])
    client = [{"role": "user", "content": [{"path": p}, "What is it?"]}, {"role": "assistant", "content": "A box."}]
    browser = [{"role": "user", "content": [{"type": "file", "file": {"path": p, "mime_type": "image/png"}}]},
               {"role": "user", "content": [{"type": "text", "text": "What is it?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "A box."}]}]
    want = [{"role": "user", "content": [{"type": "image", "image": p}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A box."}]
    assert ui.normalise_history(client) == want
    assert ui.normalise_history(browser) == want
    errored = client + [{"role": "user", "content": [{"path": str(files["text"])}]},
                        {"role": "assistant", "content": ui.ERROR + "notes.txt is neither an image nor a video"}]
    assert ui.normalise_history(errored) == want          # a failed turn is not sent to the model again


def test_answer_streams_and_equals_generate(lab, tiny, files):
    steps = list(lab.respond({"text": "What color is the circle?", "files": [str(files["img1"])]}, [], N_NEW, 0.0,
                             1.0, None))
    assert len(steps) >= 3 and all(b.startswith(a) for (a, _), (b, _) in zip(steps, steps[1:]))  # streamed
    text, session = steps[-1]
    assert text == "blue." and text == expected(tiny, image_question(files["img1"]))
    insp = session["inspections"][-1]
    assert len(insp.record) == len(insp.answer_ids) and insp.spans[0].kind == "image"


BAD = {"text": "neither an image nor a video", "empty": "empty (0 bytes)", "truncated": "cannot be read",
       "bad_video": "broken.mp4", "thin": "aspect ratio", "bomb": "too many pixels"}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_upload_is_a_clear_message(lab, files, name, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)           # 400x400 is then a decompression bomb
    text, session = final(lab, {"text": "What is it?", "files": [str(files[name])]})
    assert text.startswith(ui.ERROR) and BAD[name] in text, text
    assert session == gr.skip()                                      # nothing recorded for a failed turn


def test_empty_message_and_too_long_prompt(lab, files):
    assert "empty message" in final(lab, {"text": "  ", "files": []})[0]
    ctx = lab.model.config.text.max_position_embeddings
    text = final(lab, {"text": "hello " * ctx, "files": [str(files["img0"])]})[0]
    assert text.startswith(ui.ERROR) and f"at most {ctx}" in text and "max_pixels" in text


def test_long_video_is_sampled_within_budget(lab, files):
    text, session = final(lab, {"text": "What happens?", "files": [str(files["long"])]})
    assert not text.startswith(ui.ERROR), text
    info = session["inspections"][-1].media[0]
    assert info["frames"] < 120 and info["tokens"] <= lab.video_tokens          # 2 fps x 60 s would be 120


def test_inspector_renders_every_panel(lab, files):
    history = []
    text, session = final(lab, {"text": "Compare.", "files": [str(files["img0"]), str(files["img2"])]})
    answers, current, tokens, medias, layers, heads = ui.selectors(session, lab.processor)
    cfg = lab.model.config.text
    assert current == 0 and len(medias) == 2 and len(layers) == 1 + cfg.num_hidden_layers
    assert layers[0] == heads[0] == ui.MEAN and heads[-1] == str(cfg.num_attention_heads - 1)
    insp = ui._current(session)
    strip, md = ui.render_tokens(insp)
    assert "grid_thw [1, 14, 12]" in md and strip.axes
    posmap, patches = ui.render_media(insp, 1)
    assert posmap.axes and patches.axes
    overlay = ui.render_attention(insp, lab.processor, token=0, layer="1", head="2", media=1)
    assert len(overlay.axes) >= 2
    assert ui.render_shares(insp, lab.processor).axes
    history = [{"role": "user", "content": [{"path": str(files["img0"])}, {"path": str(files["img2"])}, "Compare."]},
               {"role": "assistant", "content": text}]
    _, session2 = final(lab, {"text": "And now?", "files": []}, history, session)
    assert len(session2["inspections"]) == 2 and session["inspections"] != session2["inspections"]
    assert ui.answer_index(history + [{"role": "user", "content": "And now?"},
                                      {"role": "assistant", "content": "x"}], 1, session2) == 0


# ---------------------------------------------------------------- the server, through gradio_client
@pytest.fixture(scope="module")
def server(tiny):
    demo = ui.build_demo(*tiny, max_new_tokens=N_NEW)
    demo.queue(default_concurrency_limit=1).launch(prevent_thread_lock=True, server_name="127.0.0.1",
                                                   server_port=None, max_file_size="1mb", quiet=True)
    yield demo
    demo.close()


def client(server):
    from gradio_client import Client
    return Client(server.local_url, verbose=False)


def ask(c, text, *paths):
    from gradio_client import handle_file
    return c.predict(message={"text": text, "files": [handle_file(str(p)) for p in paths]}, api_name="/chat")


def test_api_chat_streams_and_keeps_history(server, tiny, files):
    from gradio_client import handle_file
    c = client(server)
    job = c.submit(message={"text": "What color is the circle?", "files": [handle_file(str(files["img3"]))]},
                   api_name="/chat")
    answer = job.result()
    assert answer == "yellow." == expected(tiny, image_question(files["img3"]))
    assert len(job.outputs()) >= 2                                   # streamed in pieces
    assert ask(c, "What is it?", files["text"]).startswith(ui.ERROR)
    assert not ask(c, "And again?").startswith(ui.ERROR)             # the bad turn did not poison the chat


def test_upload_size_is_capped(server, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2**20
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        ask(client(server), "What is it?", big)


def test_four_concurrent_sessions_each_get_their_own_answer(server, tiny, files):
    names = [f"img{i}" for i in range(4)]
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda n: ask(client(server), "What color is the circle?", files[n]), names))
    assert got == [f"{c}." for c in COLORS]
    assert got == [expected(tiny, image_question(files[n])) for n in names]


@pytest.mark.parametrize("example", range(len(EXAMPLES)))
def test_api_answers_the_bundled_examples(server, example):
    """The app's example buttons (an image, two images, a video): each answered right, offline."""
    from lab.examples import OUT
    text, names, answer = EXAMPLES[example]
    assert ask(client(server), text, *(OUT / n for n in names)) == answer


def test_app_script_parses_its_arguments(monkeypatch):
    import app
    seen = {}
    monkeypatch.setattr(app.q, "load", lambda src, device=None, dtype=None: seen.update(src=src, dtype=dtype)
                        or (_ for _ in ()).throw(ValueError("stop here")))
    with pytest.raises(SystemExit, match="stop here"):
        app.main(["--model", "some/dir", "--dtype", "bfloat16"])
    assert seen == {"src": "some/dir", "dtype": torch.bfloat16}


def test_app_script_serves_the_nano_model_on_localhost():
    """`python app.py` (the README's main command) starts, binds to 127.0.0.1 and answers through /chat."""
    import socket
    import subprocess
    import time
    from gradio_client import Client, handle_file
    from lab.examples import OUT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
        else:
            pytest.fail("app.py did not start within 120 s")
        text, names, answer = EXAMPLES[0]
        got = client.predict(message={"text": text, "files": [handle_file(str(OUT / n)) for n in names]},
                             api_name="/chat")
        assert got == answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)
