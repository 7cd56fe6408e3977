"""Loading SDXL weights from every official layout, checked against the reference models.

A tiny random pipeline is written by `minsdxl.tiny` (diffusers layout) and rewritten by the tests
into Stability's single-file layout (SGM UNet names, OpenCLIP text encoder 2, LDM VAE names, fp16),
the `.fp16` variant and a sharded set. Every loader must give the reference models' outputs. The
same for a tiny refiner (one text encoder, five time ids), in both layouts.
"""

import copy
import gc
import json
import os
import re
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint
from safetensors.torch import load_file, save_file

from minsdxl import UNet, UNetConfig, convert
from minsdxl.config import REFINER_TIME_IDS
from minsdxl.loading import LoadError, check_text_encoders, encode_text, load_text_encoders, load_tokenizers, load_unet, load_vae
from minsdxl.tiny import transformers_to_open_clip, write_single_file, write_tiny_pipeline
from tests import reference_configs
from tests.parity import assert_matches_reference
from tests.test_unet import CONFIGS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(root))
    return root, pipe


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory):
    root = write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "refiner", refiner=True)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(root))
    return root, pipe


def unet_inputs(cfg=UNetConfig.tiny(), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [64.0, 64, 0, 0, 6.0] if cfg.takes_aesthetic_score else [64.0, 64, 0, 0, 64, 64]
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 10]),
            torch.randn(2, 77, cfg.cross_attention_dim, generator=g), torch.randn(2, cfg.pooled_text_dim, generator=g),
            torch.tensor([ids] * 2))


def assert_unet_matches(ours, ref_unet, what: str):
    """Our loaded UNet holds the reference's weights bit for bit (reading and renaming them is ours, so it
    is exact), and gives the reference's output within the fp32 bound of tests/parity.py (the forward
    runs on two libraries' kernels, so it is measured, not asserted, to be bitwise)."""
    theirs = ref_unet.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k].to(v.dtype)) for k, v in ours.state_dict().items())
    x, t, ctx, pooled, tid = unet_inputs(ours.config)
    with torch.no_grad():
        expected = ref_unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
        got = ours(x, t, ctx.to(ours.conv_in.weight.dtype), pooled.to(ours.conv_in.weight.dtype), tid).float()
    assert_matches_reference(got, expected, what)


# --- the inverse conversions a test needs to write Stability's layout ------------------------------

# --- key conversion -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS) + ["sdxl_base", "sdxl_refiner"])
def test_sgm_conversion_agrees_with_diffusers_converter(name):
    cfg = getattr(UNetConfig, name)() if name.startswith("sdxl_") else CONFIGS[name]
    device = "meta" if name.startswith("sdxl_") else "cpu"
    with torch.device(device):
        sd = UNet(cfg).state_dict()
    sgm = convert.unet_diffusers_to_sgm(sd)
    assert convert.unet_sgm_to_diffusers(sgm).keys() == sd.keys()  # round trip
    oracle = convert_ldm_unet_checkpoint({convert.SGM_UNET_PREFIX + k: v for k, v in sgm.items()}, cfg.to_diffusers_config())
    assert oracle.keys() == sd.keys()
    assert all(oracle[k] is sd[k] for k in sd)  # each tensor lands under the same name


def test_module_path_mapping_examples():
    cfg = UNetConfig.sdxl_base()
    assert convert.diffusers_path_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", cfg) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert convert.diffusers_path_to_sgm("up_blocks.0.upsamplers.0.conv", cfg) == "output_blocks.2.2.conv"
    assert convert.diffusers_path_to_sgm("up_blocks.2.resnets.1.conv_shortcut", cfg) == "output_blocks.7.0.skip_connection"
    assert convert.sgm_path_to_diffusers("middle_block.1.proj_in", cfg) == "mid_block.attentions.0.proj_in"


def test_open_clip_conversion_agrees_with_diffusers(tiny):
    root, pipe = tiny
    te2 = load_file(str(root / "text_encoder_2/model.safetensors"))
    open_clip = {convert.SGM_TE2_PREFIX + k: v for k, v in transformers_to_open_clip(te2).items()}
    oracle = convert_open_clip_checkpoint(pipe.text_encoder_2, open_clip, prefix=convert.SGM_TE2_PREFIX)
    ours = convert.open_clip_to_transformers({k[len(convert.SGM_TE2_PREFIX):]: v for k, v in open_clip.items()})
    assert ours.keys() == oracle.keys()
    assert all(torch.equal(ours[k], oracle[k]) for k in ours)


# --- every layout ---------------------------------------------------------------------------------

def test_diffusers_pipeline_folder(tiny):
    root, pipe = tiny
    assert_unet_matches(load_unet(root), pipe.unet, "UNet from the pipeline folder")
    assert_unet_matches(load_unet(root / "unet"), pipe.unet, "UNet from unet/")
    assert_unet_matches(load_unet(root / "unet/diffusion_pytorch_model.safetensors"), pipe.unet, "UNet from its file")
    te, tok = load_text_encoders(root), load_tokenizers(root)
    ctx, pooled = encode_text(te, tok, ["a red circle", ""])
    ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(["a red circle", ""], do_classifier_free_guidance=False)
    assert ctx.shape == (2, 77, 64)
    assert_matches_reference(ctx, ref_ctx, "text embeddings (both encoders, penultimate layers)")
    assert_matches_reference(pooled, ref_pooled, "pooled text embedding")
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    vae = load_vae(root)
    assert_matches_reference(vae.encode(img).latent_dist.mean, pipe.vae.encode(img).latent_dist.mean, "VAE latents")


def test_single_file_fp16_loads_every_component(tiny, tmp_path):
    root, pipe = tiny
    path = tmp_path / "sd_xl_tiny.safetensors"
    write_single_file(root, path)
    ref = copy.deepcopy(pipe.unet).half().float()  # the same fp16-rounded weights
    unet = load_unet(path, dtype=torch.float32)
    assert_unet_matches(unet, ref, "UNet from a single fp16 file")
    assert load_unet(path, dtype=torch.bfloat16).conv_in.weight.dtype == torch.bfloat16
    te1, te2 = load_text_encoders(path)
    for ours, theirs in ((te1, pipe.text_encoder), (te2, pipe.text_encoder_2)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v.half().float()), k
    vae = load_vae(path)
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v.half().float()), k
    # The oracle converter reads the same file to the same VAE tensors.
    sd = load_file(str(path))
    oracle = convert_ldm_vae_checkpoint(sd, json.loads((root / "vae/config.json").read_text()))
    assert all(torch.equal(oracle[k].float(), vae.state_dict()[k]) for k in oracle)

# Token ids checked against open_clip's SimpleTokenizer (CLIP's reference tokenizer) on these prompts.
CLIP_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A corgi, wearing sunglasses; 8k": [49406, 320, 31320, 267, 3309, 12906, 282, 279, 330, 49407],
    "café in 東京": [49406, 15304, 530, 48338, 21078, 361, 49407],
}


def test_single_file_tokenizers_need_no_network(tiny, tmp_path, monkeypatch):
    import socket

    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a single file's tokenizers must not touch the network")

    path = tmp_path / "sd_xl_tiny.safetensors"
    write_single_file(tiny[0], path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    tok1, tok2 = load_tokenizers(path)
    for tok, pad in ((tok1, "<|endoftext|>"), (tok2, "!")):
        assert (tok.model_max_length, tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == \
               (77, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", pad)
        ids = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
        assert ids == CLIP_IDS["a photo of a cat"] + [tok.pad_token_id] * 70
    assert (tok1.pad_token_id, tok2.pad_token_id) == (49407, 0)


def test_shipped_tokenizers_give_clips_ids(tmp_path):
    path = tmp_path / "any.safetensors"
    save_file({convert.SGM_TE1_PREFIX + "x": torch.zeros(1)}, str(path))  # load_tokenizers reads only the header
    tok1, tok2 = load_tokenizers(path)
    assert len(tok1) == len(tok2) == 49408
    for prompt, ids in CLIP_IDS.items():
        assert tok1(prompt).input_ids == tok2(prompt).input_ids == ids, prompt
    # As in the official tokenizer_2, its pad token "!" is a special token: "wow!" reads it as id 0.
    assert tok1("wow!").input_ids == [49406, 2781, 256, 49407]
    assert tok2("wow!").input_ids == [49406, 2781, 0, 49407]
    long = tok1("a dog " * 60, max_length=77, truncation=True).input_ids  # 120 words: cut to 75 + bos and eos
    assert len(long) == 77 and long[:3] == [49406, 320, 1929] and long[-1] == 49407



# --- the refiner ----------------------------------------------------------------------------------

def test_refiner_pipeline_folder(tiny_refiner):
    """unet/, text_encoder_2/ and tokenizer_2/ only: one text encoder, five time ids (model_index.json)."""
    root, pipe = tiny_refiner
    assert not (root / "text_encoder").exists() and json.loads((root / "model_index.json").read_text())["requires_aesthetics_score"]
    unet = load_unet(root, expect="refiner")
    assert unet.config.time_ids == REFINER_TIME_IDS and unet.config == UNetConfig.tiny_refiner()
    assert_unet_matches(unet, pipe.unet, "refiner UNet from the pipeline folder")
    assert_unet_matches(load_unet(root / "unet", expect="refiner"), pipe.unet, "refiner UNet from unet/")
    te, tok = load_text_encoders(root), load_tokenizers(root)
    assert len(te) == len(tok) == 1 and tok[0].pad_token == "!"
    check_text_encoders(unet, te, str(root))
    ctx, pooled = encode_text(te, tok, ["a red circle", ""])
    ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(["a red circle", ""], do_classifier_free_guidance=False)
    assert ctx.shape == (2, 77, 32)  # OpenCLIP bigG's penultimate layer alone (1280 in the real refiner)
    assert_matches_reference(ctx, ref_ctx, "refiner text embeddings (text encoder 2 alone)")
    assert_matches_reference(pooled, ref_pooled, "refiner pooled text embedding")


def test_refiner_single_file(tiny_refiner, tmp_path):
    """sd_xl_refiner_1.0.safetensors' layout: SGM UNet names, OpenCLIP bigG as conditioner embedder 0, no CLIP ViT-L."""
    root, pipe = tiny_refiner
    path = tmp_path / "sd_xl_refiner_tiny.safetensors"
    write_single_file(root, path)
    keys = load_file(str(path)).keys()
    assert any(k.startswith("conditioner.embedders.0.model.transformer.resblocks.") for k in keys)
    assert not any(k.startswith(("conditioner.embedders.0.transformer.", "conditioner.embedders.1.")) for k in keys)
    unet = load_unet(path, expect="refiner")
    assert unet.config == UNetConfig.tiny_refiner()
    assert_unet_matches(unet, copy.deepcopy(pipe.unet).half().float(), "refiner UNet from a single fp16 file")
    (te2,) = load_text_encoders(path)
    for k, v in pipe.text_encoder_2.state_dict().items():
        assert torch.equal(te2.state_dict()[k], v.half().float()), k
    # diffusers' own converter recognises the refiner's text encoder by this prefix and agrees with ours
    sd = load_file(str(path))
    oracle = convert_open_clip_checkpoint(pipe.text_encoder_2, sd, prefix=convert.SGM_REFINER_TE2_PREFIX)
    ours = convert.open_clip_to_transformers({k[len(convert.SGM_REFINER_TE2_PREFIX):]: v for k, v in sd.items()
                                              if k.startswith(convert.SGM_REFINER_TE2_PREFIX)})
    assert ours.keys() == oracle.keys() and all(torch.equal(ours[k], oracle[k]) for k in ours)
    (tok2,) = load_tokenizers(path)  # the shipped OpenCLIP tokenizer, no network
    assert tok2.pad_token == "!" and len(tok2) == 49408
    vae = load_vae(path)
    assert all(torch.equal(vae.state_dict()[k], v.half().float()) for k, v in pipe.vae.state_dict().items())


def test_base_and_refiner_given_as_each_other_say_which_they_are(tiny, tiny_refiner, tmp_path):
    base_root, refiner_root = tiny[0], tiny_refiner[0]
    write_single_file(base_root, tmp_path / "base.safetensors")
    write_single_file(refiner_root, tmp_path / "refiner.safetensors")
    for source in (refiner_root, tmp_path / "refiner.safetensors"):
        with pytest.raises(LoadError, match=rf"{re.escape(str(source))}.*not an SDXL base UNet: found the SDXL refiner "
                                            r"\(5 time ids with the aesthetic score"):
            load_unet(source)
    for source in (base_root, tmp_path / "base.safetensors"):
        with pytest.raises(LoadError, match=rf"{re.escape(str(source))}.*not an SDXL refiner UNet: found an SDXL base "
                                            r"model \(6 time ids with the target size"):
            load_unet(source, expect="refiner")
    assert load_unet(refiner_root, expect="any").config.takes_aesthetic_score
    # Text encoders that do not fit the UNet (the base's two for the refiner, and the other way round)
    with pytest.raises(LoadError, match=r"context 32 \+ 32 = 64 and pooled 32 wide, but the UNet reads context 32"):
        check_text_encoders(load_unet(refiner_root, expect="refiner"), load_text_encoders(base_root), "here")
    with pytest.raises(LoadError, match=r"context 32 = 32 .* but the UNet reads context 64"):
        check_text_encoders(load_unet(base_root), load_text_encoders(refiner_root), "here")


def test_bare_sgm_refiner_unet_is_recognised_by_its_widths(tmp_path):
    # No config anywhere: a pooled vector as wide as the context (one text encoder) means the refiner's
    # five time ids; the same widths with a wider context are the base's six.
    cfg = UNetConfig(block_out_channels=(64, 128, 128), layers_per_block=1, transformer_depth=(0, 2, 0), mid_transformer_depth=1,
                     num_heads=(1, 2, 2), cross_attention_dim=64, pooled_text_dim=64, addition_time_embed_dim=256,
                     time_ids=REFINER_TIME_IDS)
    torch.manual_seed(0)
    save_file(convert.unet_diffusers_to_sgm(UNet(cfg).state_dict()), str(tmp_path / "bare.safetensors"))
    assert load_unet(tmp_path / "bare.safetensors", expect="refiner").config == cfg


def test_bare_sgm_unet_without_config_infers_it(tmp_path):
    # A config following SDXL's conventions (head dim 64, 32 groups, 6 x 256 time features) loads
    # from shapes alone.
    cfg = UNetConfig(block_out_channels=(64, 128), layers_per_block=1, transformer_depth=(0, 2), mid_transformer_depth=1,
                     num_heads=(1, 2), cross_attention_dim=64, pooled_text_dim=32, addition_time_embed_dim=256, norm_num_groups=32)
    torch.manual_seed(0)
    ref = UNet(cfg)
    save_file(convert.unet_diffusers_to_sgm(ref.state_dict()), str(tmp_path / "bare.safetensors"))
    ours = load_unet(tmp_path / "bare.safetensors")
    assert ours.config == cfg
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g), torch.randn(1, 32, generator=g)
    tid = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 5, ctx, pooled, tid), ref(x, 5, ctx, pooled, tid), rtol=0, atol=1e-5)


def test_fp16_variant_and_sharded(tiny, tmp_path):
    root, pipe = tiny
    variant = tmp_path / "variant"
    shutil.copytree(root, variant)
    unet_file = variant / "unet/diffusion_pytorch_model.safetensors"
    sd = load_file(str(unet_file))
    unet_file.unlink()
    save_file({k: v.half() for k, v in sd.items()}, str(variant / "unet/diffusion_pytorch_model.fp16.safetensors"))
    assert_unet_matches(load_unet(variant, variant="fp16"), copy.deepcopy(pipe.unet).half().float(), "UNet, fp16 variant")

    sharded = tmp_path / "sharded"
    shutil.copytree(root / "unet", sharded)
    (sharded / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(sharded / name))
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_unet_matches(load_unet(sharded), pipe.unet, "UNet from shards")


def test_hub_repo_id_downloads_only_what_is_needed(tiny, monkeypatch):
    root, pipe = tiny
    asked = []

    def fake_snapshot_download(repo, allow_patterns, **options):
        asked.append((repo, allow_patterns, options))
        return str(root)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert_unet_matches(load_unet("someone/tiny-sdxl"), pipe.unet, "UNet from a Hub repo id")
    repo, patterns, options = asked[0]
    assert repo == "someone/tiny-sdxl" and all(p.startswith(("unet/", "model_index")) for p in patterns) and options == {}
    # train.py's --revision and --cache_dir reach every download, as diffusers' from_pretrained takes them
    hub = dict(revision="v1.0", cache_dir="/somewhere")
    asked.clear()
    load_unet("someone/tiny-sdxl", **hub), load_text_encoders("someone/tiny-sdxl", **hub)
    load_tokenizers("someone/tiny-sdxl", **hub), load_vae("someone/tiny-sdxl", **hub)
    assert len(asked) == 6 and all(options == hub for _, _, options in asked)


def test_hub_refiner_repo_gives_its_one_text_encoder(tiny_refiner, monkeypatch):
    root, pipe = tiny_refiner
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns, **options: str(root))
    assert_unet_matches(load_unet("someone/tiny-refiner", expect="refiner"), pipe.unet, "refiner UNet from a Hub repo id")
    assert len(load_text_encoders("someone/tiny-refiner")) == len(load_tokenizers("someone/tiny-refiner")) == 1


def test_hub_offline_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LoadError, match="nobody/not-cached.*could not fetch"):
        load_unet("nobody/not-cached")


# --- bad input ------------------------------------------------------------------------------------

def test_bad_files_name_the_file_and_the_problem(tiny, tmp_path):
    root, _ = tiny
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a model" * 10)
    with pytest.raises(LoadError, match="garbage.safetensors: not a safetensors file"):
        load_unet(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LoadError, match="empty.safetensors: the file is empty"):
        load_unet(empty)
    data = (root / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="cut.safetensors: truncated"):
        load_unet(cut)
    # A header entry whose byte range disagrees with its shape x dtype, and a header that is not an object.
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] += 1
    for label, text, error in (("inconsistent", json.dumps(header), f"corrupted header.*'{re.escape(name)}'"),
                               ("list", "[1, 2, 3]", "not a safetensors file")):
        body = text.encode()
        (tmp_path / f"{label}.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n:])
        with pytest.raises(LoadError, match=f"{label}.safetensors: {error}"):
            load_unet(tmp_path / f"{label}.safetensors")
    for suffix in (".ckpt", ".bin", ".pt"):
        pickle = tmp_path / f"model{suffix}"
        pickle.write_bytes(b"PK")
        with pytest.raises(LoadError, match=r"pickle checkpoint.*can run arbitrary code.*save_file"):
            load_unet(pickle)


def test_other_models_are_not_sdxl_base(tiny, tmp_path):
    root, _ = tiny
    sd = load_file(str(root / "unet/diffusion_pytorch_model.safetensors"))
    sgm = convert.unet_diffusers_to_sgm(sd)
    # SD 1.x/2.x: no size conditioning.
    sd15 = {convert.SGM_UNET_PREFIX + k: v for k, v in sgm.items() if not k.startswith("label_emb")}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(LoadError, match="sd15.safetensors: not an SDXL base UNet.*no size conditioning"):
        load_unet(tmp_path / "sd15.safetensors")
    # The refiner, recognised from its config.
    refiner = tmp_path / "refiner"
    shutil.copytree(root / "unet", refiner)
    (refiner / "config.json").write_text(json.dumps(reference_configs.SDXL_REFINER))
    with pytest.raises(LoadError, match="not an SDXL base UNet: found the SDXL refiner"):
        load_unet(refiner)


def test_missing_unexpected_and_misshapen_keys(tiny, tmp_path):
    root, _ = tiny
    sd = load_file(str(root / "unet/diffusion_pytorch_model.safetensors"))
    folder = tmp_path / "u"
    shutil.copytree(root / "unet", folder)
    broken = dict(sd)
    del broken["conv_out.bias"]
    broken["extra.weight"] = torch.zeros(1)
    save_file(broken, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LoadError, match=r"1 missing \(first ten: \['conv_out.bias'\]\), 1 unexpected .*extra.weight"):
        load_unet(folder)
    broken = dict(sd)
    broken["conv_out.bias"] = torch.zeros(5)
    save_file(broken, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LoadError, match=r"1 tensors have the wrong shape.*conv_out.bias: file \(5,\) vs model \(4,\)"):
        load_unet(folder)


@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float16, torch.bfloat16), (torch.float16, torch.float32),
                                                 (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_load_converts_exactly_like_torch(tmp_path, src_dtype, dst_dtype):
    # A tensor longer than the staging chunk, with a ragged tail, plus values that round differently
    # (subnormals, the fp16 maximum, infinities, signed zeros).
    from minsdxl.loading import CHUNK, TensorSource
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(CHUNK * 2 + 123, generator=g) * 10).to(src_dtype)
    special = torch.tensor([0.0, -0.0, 6e-8, -6e-5, 65504.0, float("inf"), -float("inf"), 1 / 3]).to(src_dtype)
    save_file({"big": big, "special": special, "empty": torch.empty(0, 3, dtype=src_dtype),
               "ints": torch.arange(5)}, str(tmp_path / "t.safetensors"))
    src = TensorSource([tmp_path / "t.safetensors"])
    for name, ref in (("big", big), ("special", special)):
        out = src.load(name, dst_dtype, "cpu")
        assert out.dtype == dst_dtype and out.shape == ref.shape
        assert torch.equal(out.view(-1), ref.view(-1).to(dst_dtype)), name
        assert torch.equal(torch.signbit(out), torch.signbit(ref.to(dst_dtype)))
    assert src.load("empty", dst_dtype, "cpu").shape == (0, 3)
    assert src.load("ints", dst_dtype, "cpu").dtype == torch.int64  # only floating point tensors change dtype
    owned = src.get("big")
    del src  # the copies own their memory: nothing refers to the closed file
    assert torch.equal(owned.view(-1), big.view(-1))


def test_a_file_cut_while_loading_names_the_tensor(tmp_path):
    from minsdxl.loading import TensorSource
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(1000, dtype=torch.float16), "b": torch.ones(10)}, str(path))
    src = TensorSource([path])  # the header is read and checked here
    offset, size = src.entries["a"][1:]
    with open(path, "r+b") as f:
        f.truncate(offset + size // 2)
    with pytest.raises(LoadError, match=r"t\.safetensors: could not read tensor 'a': the file ends early"):
        src.load("a", torch.bfloat16, "cpu")


def test_loading_leaves_torch_and_python_as_they_were(tiny, monkeypatch):
    # load_unet builds with torch.nn.init switched off, without cyclic GC, and with one intra-op
    # thread per loading thread; all three are restored, also when the load fails half way.
    from minsdxl import loading
    root, _ = tiny
    init_before, threads_before = torch.nn.init.kaiming_uniform_, torch.get_num_threads()

    def unchanged():
        assert torch.nn.init.kaiming_uniform_ is init_before and gc.isenabled()
        assert torch.get_num_threads() == threads_before
        assert torch.nn.Linear(64, 64).weight.abs().sum() > 0  # initialised again

    load_unet(root)
    unchanged()
    real_load = loading.TensorSource.load

    def failing_load(self, name, dtype, device):
        if name == "conv_out.bias":
            raise LoadError("a read failed")
        return real_load(self, name, dtype, device)

    monkeypatch.setattr(loading.TensorSource, "load", failing_load)
    with pytest.raises(LoadError, match="a read failed"):
        load_unet(root)
    unchanged()


def test_reads_without_preadv(tiny, monkeypatch):
    # Windows has no os.preadv: the reader falls back to seek + readinto, one thread at a time.
    root, pipe = tiny
    monkeypatch.delattr(os, "preadv")
    unet = load_unet(root)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in pipe.unet.state_dict().items())
