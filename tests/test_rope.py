"""Position maths: M-RoPE ids vs transformers' get_rope_index and vs the paper's rule by hand (REFERENCE 5),
vision 2D-RoPE ids (REFERENCE 2.1), and the cos/sin tables vs transformers' rotary embeddings."""
import pytest
import torch

from helpers import image, mm_token_type_ids, random_image, text, token_ids, user, video
from qwen2vl_min.rope import mrope_cos_sin, mrope_position_ids, vision_cos_sin, vision_position_ids

IMG_A = random_image(84, 56, seed=1)          # grid (1, 4, 6)
IMG_B = random_image(56, 140, seed=2)         # grid (1, 10, 4)
FRAMES = [random_image(112, 84, seed=20 + i) for i in range(6)]   # grid (3, 6, 8): T=3 <= max(3, 4)


CONVS = {
    "one_image": [user(image(IMG_A), text("Describe the image."))],
    "two_images": [user(image(IMG_A), text("Which picture is brighter?"), image(IMG_B), text("Describe."))],
    "video": [user(video(FRAMES), text("What is in the video?"))],
    "image_video": [user(image(IMG_B), video(FRAMES), text("What is in the video?"))],
    "left_padded": [user(image(IMG_A), text("Hello!")),
                    user(image(IMG_B), text("Which picture is brighter?"), video(FRAMES), text("What is in the video?"))],
}


def hf_rope_index(pair, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
    return pair.hf.model.get_rope_index(input_ids, mm_token_type_ids(input_ids, pair.cfg), image_grid_thw,
                                        video_grid_thw, attention_mask)


# ---------------------------------------------------------------- 6. vs transformers
@pytest.mark.parametrize("case", list(CONVS))
def test_mrope_position_ids_match_transformers(pair, case):
    b = pair.processor.batch(CONVS[case])
    if b.video_grid_thw is not None:     # the regime where transformers 5.23 still follows the paper's rule
        for t, h, w in b.video_grid_thw.tolist():
            assert 2 <= t <= max(h, w) // 2
    ours, our_deltas = mrope_position_ids(b.input_ids, b.image_grid_thw, b.video_grid_thw, b.attention_mask,
                                          pair.model.config)
    theirs, their_deltas = hf_rope_index(pair, b.input_ids, b.image_grid_thw, b.video_grid_thw, b.attention_mask)
    B, L = b.input_ids.shape
    assert ours.shape == (3, B, L) and our_deltas.shape == (B, 1)
    n_pad = (L - b.attention_mask.sum(1)).view(B, 1)
    if case == "left_padded":
        assert n_pad[0, 0] > 0 and n_pad[1, 0] == 0
    for i in range(B):
        keep = b.attention_mask[i].bool()
        assert torch.equal(ours[:, i, keep], theirs[:, i, keep])
    # transformers v5 counts the delta against the unpadded length, ours (v4 convention) the padded one.
    assert torch.equal(our_deltas, their_deltas - n_pad)
    assert torch.equal(our_deltas[n_pad == 0], their_deltas[n_pad == 0])
    assert (our_deltas < 0).all()         # every row holds a visual block: fewer positions than tokens


# ---------------------------------------------------------------- 7. REFERENCE 5.3 by hand
def test_mrope_worked_example_reference_5_3(pair, tok):
    ids = token_ids(tok)
    prefix = [tok.token_to_id("<|im_start|>"), 11, 12, ids["vision_start"]]   # <|im_start|> user \n <|vision_start|>
    input_ids = torch.tensor([prefix + [ids["image_pad"]] * 64 + [ids["vision_end"], 21, 22]])   # + 2 text tokens
    assert input_ids.shape == (1, 71)
    grid = torch.tensor([[1, 16, 16]])
    pos, delta = mrope_position_ids(input_ids, grid, None, None, pair.model.config)

    expected = [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]
    expected += [[4, 4 + r, 4 + c] for r in range(8) for c in range(8)]   # image: t = 4, h / w = 4..11
    expected += [[12, 12, 12], [13, 13, 13], [14, 14, 14]]               # <|vision_end|> 12, text 13, 14
    assert pos[:, 0].T.tolist() == expected
    assert delta.tolist() == [[-56]]
    assert 71 + delta.item() == 15                                          # first generated token's position
    # transformers (4.57 and 5.23 alike) agrees here
    theirs, their_delta = hf_rope_index(pair, input_ids, grid)
    assert torch.equal(pos, theirs) and their_delta.tolist() == [[-56]]


# ---------------------------------------------------------------- 8. long video: paper rule, not transformers 5.23
def test_mrope_long_video_follows_paper_rule(pair, tok):
    ids = token_ids(tok)
    grid = torch.tensor([[30, 12, 20]])                 # LLM grid 30 x 6 x 10 = 1800 tokens; T = 30 > max(6, 10)
    prefix = [tok.token_to_id("<|im_start|>"), 11, 12, ids["vision_start"]]
    input_ids = torch.tensor([prefix + [ids["video_pad"]] * 1800 + [ids["vision_end"], 21, 22]])
    L = 4 + 1800 + 1 + 2
    assert input_ids.shape == (1, L)
    pos, delta = mrope_position_ids(input_ids, None, grid, torch.ones_like(input_ids), pair.model.config)

    expected = [[i, i, i] for i in range(4)]
    expected += [[4 + t, 4 + r, 4 + c] for t in range(30) for r in range(6) for c in range(10)]   # t 4..33
    expected += [[34, 34, 34], [35, 35, 35], [36, 36, 36]]   # <|vision_end|> = max(33, 9, 13) + 1, then text
    assert pos[:, 0].T.tolist() == expected
    assert delta.tolist() == [[36 + 1 - L]] == [[-1770]]

    # transformers 5.23 advances only by max(h, w) / 2 = 10 after a video, ignoring t, so its <|vision_end|>
    # lands at 14, inside the video's t range 4..33 (REFERENCE 5.2). That is why we do not follow it.
    theirs, _ = hf_rope_index(pair, input_ids, None, grid)
    end = 4 + 1800
    assert theirs[:, 0, end].tolist() != pos[:, 0, end].tolist()
    assert theirs[:, 0, end].tolist() == [14, 14, 14]


# ---------------------------------------------------------------- 9. vision ids and cos/sin tables
def test_vision_position_ids_reference_2_1():
    expected = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
                (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    got = vision_position_ids(torch.tensor([[1, 4, 4]]))
    assert [tuple(r) for r in got.tolist()] == expected
    # every temporal patch repeats the same (h, w) ids
    assert [tuple(r) for r in vision_position_ids(torch.tensor([[2, 4, 4]])).tolist()] == expected * 2


def test_vision_position_ids_and_cos_sin_match_transformers(pair):
    from transformers.vision_utils import get_vision_position_ids
    grid = torch.tensor([[1, 4, 6], [3, 6, 8], [1, 10, 4]])
    ours = vision_position_ids(grid)
    theirs = get_vision_position_ids(grid, 2)
    assert torch.equal(ours, theirs)
    visual = pair.hf.model.visual
    cos, sin = vision_cos_sin(ours, pair.model.config.vision.head_dim, pair.model.config.vision.rope_theta)
    their_cos, their_sin = visual.rotary_pos_emb(torch.zeros(1), theirs)
    assert cos.shape == their_cos.shape
    torch.testing.assert_close(cos, their_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, their_sin, rtol=0, atol=1e-6)


def test_mrope_cos_sin_matches_transformers(pair):
    g = torch.Generator().manual_seed(0)
    position_ids = torch.randint(0, 4000, (3, 2, 17), generator=g)     # three different rows (t, h, w)
    assert not torch.equal(position_ids[0], position_ids[1]) and not torch.equal(position_ids[1], position_ids[2])
    t = pair.model.config.text
    cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
    their_cos, their_sin = pair.hf.model.language_model.rotary_emb(torch.zeros(1), position_ids)
    assert cos.shape == their_cos.shape == (2, 17, t.head_dim)
    torch.testing.assert_close(cos, their_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, their_sin, rtol=0, atol=1e-6)
