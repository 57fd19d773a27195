"""The encoder stage reads every layer through the model's own pooler, exactly as open_clip would."""

import pytest
import torch

from latent_verbalizer.services.encoder.stage import capture_blocks, check_layers, encode


@pytest.mark.parametrize("model", ["tiny", "trained_like"])
def test_last_layer_latents_equal_open_clip(model, pixels, request):
    lm = request.getfixturevalue(model)
    latents = encode(lm.model.visual, pixels, check_layers(lm.model.visual, None))
    _, tokens = lm.model._encode_image(pixels)
    assert latents.shape == (lm.num_layers, 6, 8, 48)  # [L, N, Q-1, D]
    assert torch.allclose(latents[-1], tokens, atol=1e-5)


def test_every_layer_equals_open_clip_pool_of_that_block(tiny, pixels):
    visual = tiny.model.visual
    latents = encode(visual, pixels, [0, 2])
    x = visual._embeds(pixels)
    expected = []
    for i, block in enumerate(visual.transformer.resblocks[:3]):
        x = block(x)
        if i in (0, 2):
            expected.append(visual._pool(x)[1])
    assert torch.allclose(latents, torch.stack(expected), atol=1e-5)


def test_capture_is_the_residual_stream(tiny, pixels):
    visual = tiny.model.visual
    hidden = capture_blocks(visual, pixels, [1, 3])
    full = visual.forward_intermediates(pixels, indices=[1, 3], output_fmt="NLC", intermediates_only=True,
                                        output_extra_tokens=True)
    for h, inter, prefix in zip(hidden, full["image_intermediates"], full["image_intermediates_prefix"]):
        assert torch.allclose(h, torch.cat([prefix, inter], 1), atol=1e-6)


def test_layer_selection_errors(tiny):
    assert check_layers(tiny.model.visual, [-1, 0]) == [3, 0]
    with pytest.raises(ValueError, match="blocks 0..3"):
        check_layers(tiny.model.visual, [4])
    with pytest.raises(ValueError, match="repeat"):
        check_layers(tiny.model.visual, [1, 1])
