"""lab.trace: the attention recorded during generation equals transformers' eager attention weights.

The oracle is transformers run once over the prompt plus the generated tokens with output_attentions=True:
row p of its layer-l weights is what the query at position p attended to, so it must equal the record
of the token that query chose. Also: recording never changes the tokens, and the record stays bounded.
"""
import pytest
import torch

import qwen2vl_min as q
from helpers import image, random_image, text, user, video
from lab.trace import record_attention
from test_parity import extend, hf_kwargs

N_NEW = 8
CONV_IMAGE = user(image(random_image(112, 84, seed=5)), text("Which picture is brighter?"))
CONV_VIDEO = user(video([random_image(84, 56, seed=60 + i) for i in range(4)]), text("What is in the video?"))
PADDED = [user(image(random_image(56, 140, seed=2)), text("Hi")),
          user(image(random_image(112, 112, seed=7)), text("Which picture is brighter? Hello! How are you?"))]


def hf_attentions(pair, b):
    pair.hf.model.rope_deltas = None
    with torch.no_grad():
        return pair.hf(**hf_kwargs(pair, b), output_attentions=True).attentions   # layers x (B, H, L, L)


@pytest.mark.parametrize("conv", [CONV_IMAGE, CONV_VIDEO], ids=["image", "video"])
def test_recorded_attention_equals_transformers(pair, conv):
    b = pair.processor(conv)
    plain = list(q.generate(pair.model, b, N_NEW, stop_token_ids=[]))
    with record_attention(pair.model) as rec:
        tokens = list(q.generate(pair.model, b, N_NEW, stop_token_ids=[]))
    assert tokens == plain                                    # watching never changes the answer
    assert len(rec) == N_NEW
    L = b.input_ids.shape[1]
    theirs = hf_attentions(pair, extend(b, torch.tensor([tokens[:-1]])))
    for i in range(N_NEW):
        p = L - 1 + i                                         # the query that chose token i
        ours = rec.probs(i)                                   # (layers, H, p + 1)
        ref = torch.stack([a[0, :, p, :p + 1] for a in theirs])
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-5
        assert torch.allclose(ours.sum(-1), torch.ones(ours.shape[:2]), atol=1e-5)


def test_recorded_attention_left_padded_batch(pair_a):
    b = pair_a.processor.batch(PADDED)
    with record_attention(pair_a.model) as rec:
        steps = list(q.generate(pair_a.model, b, 4, stop_token_ids=[]))
    tokens = torch.tensor(steps).T                             # (B, n)
    theirs = hf_attentions(pair_a, extend(b, tokens[:, :-1]))
    L = b.input_ids.shape[1]
    for row in range(2):
        keep = extend(b, tokens[:, :-1]).attention_mask[row].bool()
        for i in range(4):
            p = L - 1 + i
            ours = rec.probs(i, row)
            assert ours[..., ~keep[:p + 1]].abs().sum() == 0  # padding gets nothing
            ref = torch.stack([a[row, :, p, :p + 1] for a in theirs])
            assert (ours - ref)[..., keep[:p + 1]].abs().max().item() <= 1e-5


def test_record_is_bounded_and_hooks_are_removed(pair_a):
    b = pair_a.processor(CONV_IMAGE)
    with record_attention(pair_a.model, max_tokens=3) as rec:
        list(q.generate(pair_a.model, b, N_NEW, stop_token_ids=[]))
    assert len(rec) == 3 and all(len(qs) == 3 for qs in rec.queries)
    attn = pair_a.model.model.layers[0].self_attn
    assert not attn._forward_hooks and not attn.q_proj._forward_hooks


def test_spans_kinds_and_shares_of_a_mixed_prompt(pair_a):
    from lab.attention import KINDS, grid_map, modality_share, reduce, token_kinds, visual_spans
    conv = user(image(random_image(112, 84, seed=5)), video([random_image(84, 56, seed=60 + i) for i in range(4)]),
                text("Compare them."))
    b = pair_a.processor(conv)
    cfg, ids = pair_a.model.config, b.input_ids[0]
    spans = visual_spans(ids, b.image_grid_thw, b.video_grid_thw, cfg)
    assert [(s.kind, s.grid) for s in spans] == [("image", (1, 3, 4)), ("video", (2, 2, 3))]
    assert all((ids[s.start:s.end] == ids[s.start]).all() and ids[s.start - 1] == cfg.vision_start_token_id
               and ids[s.end] == cfg.vision_end_token_id for s in spans)
    kinds = token_kinds(ids, cfg)
    assert kinds.count("image") == 12 and kinds.count("video") == 12 and kinds.count("special") == 4
    with record_attention(pair_a.model) as rec:
        tokens = list(q.generate(pair_a.model, b, 3, stop_token_ids=[]))
    probs = rec.probs(2)                                       # saw the prompt and 2 answer tokens
    share = modality_share(probs, kinds + ["text"] * len(tokens))
    assert set(share) == set(KINDS) and abs(sum(share.values()) - 1) < 1e-5
    assert abs(share["image"] - float(reduce(probs)[spans[0].start:spans[0].end].sum())) < 1e-6
    assert grid_map(reduce(probs, 0, 1), spans[1]).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="label the generated tokens"):
        modality_share(probs, kinds)
