"""The family interface's naming and plumbing, family-neutral parts: what --model means, what is refused with
which reason, what the gateway knows without loading a model, and CoCa behind the interface."""

import json

import pytest
import torch
from PIL import Image

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.decoder.stage import decode
from latent_verbalizer.services.encoder.stage import encode_batch
from latent_verbalizer.services.families import FamilyError, load_family, resolve
from latent_verbalizer.services.families.naming import PROJECT_MODELS, describe
from latent_verbalizer.services.gateway.model_info import describe_model
from latent_verbalizer.shared.schemas import DecodeParams
from latent_verbalizer.shared.settings import Settings


def saved_config(tmp_path, model_type: str):
    """A directory as save_pretrained leaves it, as far as naming reads it (config.json)."""
    config = {"model_type": model_type, "vision_config": {"num_hidden_layers": 3, "image_size": 32, "patch_size": 8},
              "text_config": {"max_position_embeddings": 64}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_name_means_a_family_and_a_place():
    assert resolve("coca_tiny").family == "coca"
    assert resolve("coca_ViT-B-32").location == "coca_ViT-B-32"
    assert set(PROJECT_MODELS) >= {"coca_synth_demo", "llava_synth_demo"}
    assert resolve("coca_synth_demo").family == "coca"


@pytest.mark.parametrize("model_type, family", [("llava", "llava"), ("blip", "blip")])
def test_a_save_pretrained_directory_says_its_family(tmp_path, model_type, family):
    source = resolve(str(saved_config(tmp_path, model_type)))
    assert (source.family, source.location, source.hub) == (family, str(tmp_path), False)
    shape = describe(source, None, "Say it.")
    assert shape["layers"] == 3 and shape["image_size"] == [32, 32] and shape["prompt"] == "Say it."
    assert shape["missing"]["contrastive"] and shape["pretrained"] is None


def test_family_can_be_forced_and_unknown_types_are_named(tmp_path):
    saved_config(tmp_path, "qwen2_vl")
    with pytest.raises(FamilyError, match="model_type 'qwen2_vl'.*--family forces one"):
        resolve(str(tmp_path))
    assert resolve(str(tmp_path), "llava").family == "llava"
    with pytest.raises(FamilyError, match="unknown family 'gpt'; families: coca, llava, blip"):
        resolve("coca_tiny", "gpt")


def test_unknown_names_and_bare_directories_say_what_is_accepted(tmp_path):
    with pytest.raises(FamilyError, match="open_clip CoCa name.*project model.*Hugging Face id.*save_pretrained"):
        resolve("no_such_model")
    with pytest.raises(FamilyError, match="without a config.json"):
        resolve(str(tmp_path))


def test_a_hub_id_offline_is_one_error_naming_what_to_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache; conftest sets HF_HUB_OFFLINE
    with pytest.raises(FamilyError) as e:
        resolve("someorg/some-vlm")
    message = str(e.value)
    assert "not in the local Hugging Face cache" in message
    assert "huggingface-cli download someorg/some-vlm" in message and "models--someorg--some-vlm" in message


def test_pretrained_and_prompt_refused_where_they_do_not_apply(tmp_path):
    with pytest.raises(FamilyError, match="--prompt .* CoCa model"):
        load_family("coca_tiny", prompt="Describe it.")
    with pytest.raises(FamilyError, match="--pretrained names CoCa weights.*llava model"):
        load_family(str(saved_config(tmp_path, "llava")), "some-tag")


def test_cli_refuses_pretrained_for_another_family_with_exit_2(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "m").mkdir()
    model = saved_config(tmp_path / "m", "blip")
    code = main(["verbalize", str(image), "--out", str(tmp_path / "out"), "--model", str(model), "--pretrained", "x"])
    assert code == 2 and "--pretrained names CoCa weights" in capsys.readouterr().err


def test_gateway_model_info_reads_configs_only(tmp_path):
    info = describe_model(Settings(model="coca_tiny"))
    assert (info.family, info.layers, info.extras) == ("coca", 4, {"contrastive": None, "regions": None,
                                                                   "attributions": None})
    info = describe_model(Settings(model=str(saved_config(tmp_path, "blip")), pretrained="ignored", prompt="a"))
    assert (info.family, info.layers, info.pretrained, info.prompt) == ("blip", 3, None, "a")
    assert "contrastive" in info.extras["contrastive"]
    unknown = describe_model(Settings(model="someorg/not-cached"))
    assert unknown.layers is None and unknown.family is None


def test_coca_behind_the_interface(tiny, pixels):
    assert (tiny.family, tiny.num_layers, tiny.feature_layer, tiny.prompt) == ("coca", 4, 3, None)
    assert tiny.stop_ids == (tiny.end_id, 0) and tiny.force_end_at_limit and tiny.default_min_seq_len == 5
    assert tiny.describe()["extras"] == {"contrastive": None, "regions": None, "attributions": None}
    encoded = encode_batch(tiny, pixels[:2], [0, 3], grounding=True)
    assert encoded.latents.shape[:2] == (2, 2) and encoded.image_embeddings.shape[0] == 2
    assert torch.equal(encoded.null_latents, tiny.encode(tiny.null_pixels(), [0, 3]).latents)
    rows = encoded.latents.flatten(0, 1)
    decoded = decode(tiny, rows, DecodeParams(seq_len=8))
    assert all(d.text == tiny.decode_text(d.tokens) for d in decoded)
    assert tiny.token_texts(decoded[0].tokens) == [tiny.tokenizer.decode([t]) for t in decoded[0].tokens]
