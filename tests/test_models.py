"""Model loading: checkpoints through the user-facing path, and errors a user can act on."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_verbalizer.services.encoder.stage import encode
from latent_verbalizer.services.families import load_family
from latent_verbalizer.shared.models import ModelError, load_model, save_checkpoint


def test_random_weights_are_reproducible(tiny):
    again = load_model("coca_tiny")
    for a, b in zip(tiny.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert tiny.model.text_decoder.text_projection.abs().sum() > 0  # open_clip leaves it torch.empty


def test_checkpoint_written_by_test_loads_through_user_path(tmp_path, pixels):
    model = load_model("coca_tiny").model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(model, path)
    loaded = load_model("coca_tiny", pretrained=str(path))
    assert torch.equal(encode(loaded.model.visual, pixels, [3]), encode(model.visual, pixels, [3]))
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    assert torch.equal(load_model("coca_tiny", str(tmp_path / "tiny.pt")).model.logit_scale, model.logit_scale)


def test_mismatched_checkpoint_is_named(tmp_path, tiny):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny.model, path)
    state = load_file(str(path))
    state["visual.proj"] = torch.zeros(3, 3)
    del state["text.cls_emb"]
    save_file(state, str(path))
    with pytest.raises(ModelError, match="does not match the coca_tiny architecture"):
        load_model("coca_tiny", str(path))


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_model("coca_tiny", str(bad))


def test_non_coca_model_is_refused():
    with pytest.raises(ModelError, match="needs a multimodal text decoder"):
        load_model("ViT-B-32")


def test_unknown_names_and_tags():
    with pytest.raises(ModelError, match="unknown model 'coca_nope'.*coca_ViT-L-14"):
        load_model("coca_nope")
    with pytest.raises(ModelError, match="unknown pretrained tag 'nope'.*mscoco_finetuned"):
        load_model("coca_ViT-B-32", "nope")
    with pytest.raises(ModelError, match="checkpoint file not found"):
        load_model("coca_tiny", "/no/such/weights.safetensors")


def test_weights_missing_offline_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not in the local cache.*--pretrained"):
        load_model("coca_ViT-B-32", "laion2b_s13b_b90k", cache_dir=tmp_path)


def test_reduced_precision_decodes(pixels):
    from latent_verbalizer.services.decoder.stage import caption_layers

    lm = load_family("coca_tiny", dtype="bf16")
    latents = encode(lm.model.visual, pixels.to(torch.bfloat16), [0, 3])
    caps = caption_layers(lm, latents, [0, 3], [str(i) for i in range(6)])
    assert all(c.tokens for per_image in caps for c in per_image)
