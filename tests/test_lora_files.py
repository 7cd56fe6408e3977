"""SDXL LoRA files: ours load in diffusers' StableDiffusionXLPipeline with the same effect, and back here."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import lora
from minsdxl import load_text_encoders, load_unet
from minsdxl.lora_files import load_sdxl_lora, save_sdxl_lora
from minsdxl.tiny import write_tiny_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


def trained_unet(root, seed=1):
    unet = load_unet(root)
    lora.inject(unet, TARGETS, rank=4, alpha=8)  # scale 2: a wrong scale in any loader shows
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(unet).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.05)
    return unet


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 30]), torch.randn(2, 77, 64, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_our_lora_loads_in_diffusers_with_the_same_effect(tiny_dir, tmp_path, fmt):
    unet = trained_unet(tiny_dir)
    path = save_sdxl_lora(unet, tmp_path / f"{fmt}.safetensors", format=fmt)
    x, t, ctx, pooled, tid = inputs()
    with torch.no_grad():
        ours = unet(x, t, ctx, pooled, tid)
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
        base = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_round_trip_into_a_fresh_unet(tiny_dir, tmp_path, fmt):
    unet = trained_unet(tiny_dir)
    path = save_sdxl_lora(unet, tmp_path / "l.safetensors", format=fmt)
    if fmt == "kohya":
        keys = lora.read_file(path)[0]
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert float(keys["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"]) == 8.0
    fresh = load_unet(tiny_dir)
    assert load_sdxl_lora(fresh, path).unused == []
    x, t, ctx, pooled, tid = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, ctx, pooled, tid), unet(x, t, ctx, pooled, tid))


def test_text_encoder_adapters_use_te_prefixes(tiny_dir, tmp_path):
    unet = trained_unet(tiny_dir)
    te1, te2 = load_text_encoders(tiny_dir)
    for te in (te1, te2):
        lora.inject(te, ["q_proj", "v_proj"], rank=2)
    path = save_sdxl_lora(unet, tmp_path / "k.safetensors", format="kohya", text_encoders=(te1, te2))
    keys = lora.read_file(path)[0]
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_") for k in keys)
    with pytest.raises(lora.LoRAError, match="pass text_encoders="):
        load_sdxl_lora(load_unet(tiny_dir), path)
    fresh_tes = load_text_encoders(tiny_dir)
    assert load_sdxl_lora(load_unet(tiny_dir), path, text_encoders=fresh_tes).unused == []
    assert len(lora.lora_layers(fresh_tes[1])) == len(lora.lora_layers(te2))


def test_a_lora_for_another_model_is_an_error(tiny_dir, tmp_path):
    from safetensors.torch import save_file
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(lora.LoRAError, match=r"1 of 1 modules fit no layer \(1 LoRA\): this LoRA is for SD 1.x/2.x.*input_blocks_1_1_proj_in"):
        load_sdxl_lora(load_unet(tiny_dir), tmp_path / "sd15.safetensors")
