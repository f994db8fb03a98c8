"""Prompted encoders: equal to plain CLIP without prompts; insertion/replacement checked by hand."""

from __future__ import annotations

import torch
from helpers import token_ids

from restore.clip.model import causal_mask
from restore.prompting.encoders import DeepTokens, PromptedTextEncoder, PromptedVisionEncoder




@torch.no_grad()
def test_no_prompts_equals_plain_clip(tiny_clip):
    ids = token_ids([5, 9, 7])
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    text = PromptedTextEncoder(tiny_clip).encode_token_ids(ids)
    assert torch.allclose(text.features, tiny_clip.encode_text(ids), atol=1e-5)
    assert text.pooled_index.tolist() == [5, 9, 7]
    # untruncated path gives the same features too
    full = PromptedTextEncoder(tiny_clip).encode_token_ids(ids, truncate=False)
    assert torch.allclose(full.features, text.features, atol=1e-5)
    assert full.tokens.shape[1] == 77 and text.tokens.shape[1] == 10
    vision = PromptedVisionEncoder(tiny_clip)(image)
    assert torch.allclose(vision.features, tiny_clip.encode_image(image), atol=1e-5)


@torch.no_grad()
def test_text_insertion_matches_manual_computation(tiny_clip):
    """Insert 2 tokens after BOT at layer 3, replace them at layer 4: compare with a hand-written loop."""
    ids = token_ids([6, 4])
    width = tiny_clip.transformer.width
    gen = torch.Generator().manual_seed(2)
    t3, t4 = torch.randn(2, width, generator=gen), torch.randn(2, width, generator=gen)
    group = DeepTokens([t3, t4], first_layer=3, position=1, insert=True, name="rep")
    out = PromptedTextEncoder(tiny_clip).encode_token_ids(ids, deep=[group], return_hidden=True, truncate=False)

    x = tiny_clip.token_embedding(ids) + tiny_clip.positional_embedding
    blocks = tiny_clip.transformer.resblocks
    for layer, block in enumerate(blocks):
        if layer == 3:
            x = torch.cat([x[:, :1], t3.expand(2, -1, -1), x[:, 1:]], dim=1)
        if layer == 4:
            x = torch.cat([x[:, :1], t4.expand(2, -1, -1), x[:, 3:]], dim=1)
        x = block(x, causal_mask(x.shape[1]))
    x = tiny_clip.ln_final(x)
    expected = x[torch.arange(2), torch.tensor([6 + 2, 4 + 2])] @ tiny_clip.text_projection
    assert out.pooled_index.tolist() == [8, 6]
    assert out.slots == {"rep": slice(1, 3)}
    assert [h.shape[1] for h in out.hidden_states] == [77] * 3 + [79] * 9
    assert out.prompt_masks[5][1:3].all() and out.prompt_masks[5].sum() == 2 and not out.prompt_masks[0].any()
    assert torch.allclose(out.features, expected, atol=1e-5)


@torch.no_grad()
def test_two_text_insertions_at_one_layer_shift_eot_by_both(tiny_clip):
    """2 tokens after BOT and 3 appended at the end, same layer: the EOT moves by 2 only (it sits
    before the appended ones) and the features equal a hand-written loop."""
    ids = token_ids([6, 4])
    width = tiny_clip.transformer.width
    gen = torch.Generator().manual_seed(3)
    front, back = torch.randn(2, width, generator=gen), torch.randn(3, width, generator=gen)
    groups = [DeepTokens([front], first_layer=2, position=1, insert=True, name="front"),
              DeepTokens([back], first_layer=2, position=None, insert=True, name="back")]
    for order in (groups, groups[::-1]):
        out = PromptedTextEncoder(tiny_clip).encode_token_ids(ids, deep=order, truncate=False)
        x = tiny_clip.token_embedding(ids) + tiny_clip.positional_embedding
        for layer, block in enumerate(tiny_clip.transformer.resblocks):
            if layer == 2:
                x = torch.cat([x[:, :1], front.expand(2, -1, -1), x[:, 1:], back.expand(2, -1, -1)], dim=1)
            x = block(x, causal_mask(x.shape[1]))
        x = tiny_clip.ln_final(x)
        expected = x[torch.arange(2), torch.tensor([8, 6])] @ tiny_clip.text_projection
        assert out.pooled_index.tolist() == [8, 6]
        assert torch.allclose(out.features, expected, atol=1e-5)


@torch.no_grad()
def test_text_replacement_keeps_length_and_causality(tiny_clip):
    """MaPLe-style deep text prompts overwrite positions 1..n; tokens before them are unaffected."""
    ids = token_ids([7, 8])
    encoder = PromptedTextEncoder(tiny_clip)
    tok = [torch.randn(2, tiny_clip.transformer.width) for _ in range(3)]
    group = DeepTokens(tok, first_layer=1, position=1, insert=False)
    plain = encoder.encode_token_ids(ids, return_hidden=True)
    prompted = encoder.encode_token_ids(ids, deep=[group], return_hidden=True)
    assert [h.shape[1] for h in prompted.hidden_states] == [9] * 12
    assert prompted.pooled_index.tolist() == [7, 8]
    # position 0 (SOT) never attends to later tokens: identical in every layer
    for h_plain, h_prompted in zip(plain.hidden_states, prompted.hidden_states):
        assert torch.allclose(h_plain[:, 0], h_prompted[:, 0], atol=1e-5)
    assert not torch.allclose(plain.features, prompted.features, atol=1e-3)


@torch.no_grad()
def test_vision_append_then_replace_matches_manual(tiny_clip):
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    visual = tiny_clip.visual
    width = visual.transformer.width
    p0, p1 = torch.randn(2, width), torch.randn(2, width)
    group = DeepTokens([p0, p1], first_layer=0, position=None, insert=True, name="vpt")
    out = PromptedVisionEncoder(tiny_clip)(image, deep=[group])

    x = visual.embed(image)
    x = visual.ln_pre(torch.cat([x, p0.unsqueeze(0)], dim=1))
    for layer, block in enumerate(visual.transformer.resblocks):
        if layer == 1:
            x = torch.cat([x[:, :-2], p1.unsqueeze(0)], dim=1)
        x = block(x)
    expected = visual.ln_post(x[:, 0]) @ visual.proj
    assert out.slots == {"vpt": slice(50, 52)}
    assert torch.allclose(out.features, expected, atol=1e-5)


@torch.no_grad()
def test_insertion_before_a_group_shifts_it(tiny_clip):
    image = torch.randn(1, 3, 224, 224)
    width = tiny_clip.visual.transformer.width
    vpt = DeepTokens([torch.randn(2, width)], first_layer=0, name="vpt")
    rep = DeepTokens([torch.randn(3, width)] * 2, first_layer=6, position=1, name="rep")
    out = PromptedVisionEncoder(tiny_clip)(image, deep=[vpt, rep], return_hidden=True)
    assert out.slots == {"vpt": slice(53, 55), "rep": slice(1, 4)}
    assert [h.shape[1] for h in out.hidden_states] == [52] * 6 + [55] * 6


def test_prompt_depth_beyond_backbone_is_a_clear_error(tiny_clip):
    import pytest

    group = DeepTokens([torch.zeros(2, tiny_clip.transformer.width)] * 13, first_layer=0)
    with pytest.raises(ValueError, match="prompt depth"):
        PromptedTextEncoder(tiny_clip).encode_token_ids(token_ids([4]), deep=[group])


def test_plain_features_share_the_blocks_before_the_prompts_and_equal_a_frozen_run(tiny_clip):
    """``plain=True``: the frozen tower's features of the same images, bit-equal to a separate run without
    tokens, without gradient, for groups first acting at layer 0, in the middle, or not at all."""
    enc = PromptedVisionEncoder(tiny_clip)
    res = tiny_clip.visual.input_resolution
    image = torch.randn(3, 3, res, res)
    with torch.no_grad():
        reference = enc(image).features
    for first in (0, 1, enc.num_layers - 1, None):
        deep = [] if first is None else [DeepTokens([torch.randn(2, enc.width, requires_grad=True)
                                                     for _ in range(enc.num_layers - first)], first_layer=first,
                                                    position=1)]
        out = enc(image, deep, plain=True)
        assert out.plain_features is not None and not out.plain_features.requires_grad
        assert torch.equal(out.plain_features, reference), first
        if first is not None:
            assert not torch.equal(out.features, reference)
    assert enc(image, []).plain_features is None
