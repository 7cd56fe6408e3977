"""The hand-written UNet is the same function as diffusers' UNet2DConditionModel.

Same weights (loaded with strict=True, so the module names match too), same inputs, compared in
fp32 to 1e-5 of the output's scale, on several SDXL-family configs, base-shaped and refiner-shaped
(five time ids with the aesthetic score, text from one encoder); the full SDXL base and refiner
configs are checked key by key on the meta device. The full-size numerical checks are `slow`.
"""

import dataclasses
import gc

import pytest
import torch
from diffusers import UNet2DConditionModel

from minsdxl import ConfigError, UNet, UNetConfig
from minsdxl.config import BASE_TIME_IDS, REFINER_TIME_IDS
from tests import reference_configs
from tests.parity import assert_matches_reference

# Configs other than the tiny preset: different level counts, attention placement, depths and
# head counts, so that a bug hidden by the tiny preset's regularity still shows.
FOUR_LEVELS = dataclasses.replace(
    UNetConfig.tiny(),
    block_out_channels=(32, 64, 96, 64),
    transformer_depth=(0, 1, 2, 0),  # refiner-like: no attention at the first and last level
    mid_transformer_depth=2,  # diffusers ties it to the last level's entry
    num_heads=(1, 4, 3, 2),
    layers_per_block=1,
    cross_attention_dim=48,
    pooled_text_dim=16,
    addition_time_embed_dim=4,
)
ALL_ATTENTION = dataclasses.replace(
    UNetConfig.tiny(),
    block_out_channels=(32, 48),
    transformer_depth=(1, 3),
    mid_transformer_depth=3,
    num_heads=(4, 1),
    layers_per_block=3,
    norm_num_groups=16,
)
# Refiner-shaped: five time ids (the aesthetic score instead of the target size), a pooled vector as wide
# as the context (one text encoder), no attention at either end; sizes unlike the refiner preset's.
REFINER_LIKE = dataclasses.replace(
    UNetConfig.tiny(),
    block_out_channels=(32, 64, 64, 96),
    transformer_depth=(0, 2, 1, 0),
    mid_transformer_depth=3,
    num_heads=(1, 2, 4, 3),
    cross_attention_dim=40,
    pooled_text_dim=40,
    addition_time_embed_dim=8,
    time_ids=REFINER_TIME_IDS,
)
REFINER_THREE_LEVELS = dataclasses.replace(
    UNetConfig.tiny(),
    block_out_channels=(32, 48, 64),
    transformer_depth=(0, 3, 0),
    mid_transformer_depth=2,
    num_heads=(2, 3, 4),
    layers_per_block=1,
    cross_attention_dim=24,
    pooled_text_dim=24,
    addition_time_embed_dim=6,
    time_ids=REFINER_TIME_IDS,
    norm_num_groups=16,
)
CONFIGS = {"tiny": UNetConfig.tiny(), "four_levels": FOUR_LEVELS, "all_attention": ALL_ATTENTION,
           "refiner_like": REFINER_LIKE, "refiner_three_levels": REFINER_THREE_LEVELS}


def make_pair(cfg: UNetConfig, seed: int = 0):
    """A random diffusers UNet of `cfg` and ours with the same weights (strict load)."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**cfg.to_diffusers_config()).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def make_inputs(cfg: UNetConfig, batch: int = 2, size: int = 16, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([999, 17][:batch] + [500] * max(0, batch - 2))
    context = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_text_dim, generator=g)
    last = [6.0] if cfg.takes_aesthetic_score else [1024.0, 1024.0]  # aesthetic score, or target size
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 64.0, *last]] * batch)
    return [a.to(dtype) if a.is_floating_point() else a for a in (x, t, context, pooled, time_ids)]


def reference_forward(ref, x, t, context, pooled, time_ids):
    added = {"text_embeds": pooled, "time_ids": time_ids}
    return ref(x, t, context, added_cond_kwargs=added).sample


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_fp32(name):
    cfg = CONFIGS[name]
    ref, ours = make_pair(cfg)
    inputs = make_inputs(cfg)
    with torch.no_grad():
        expected = reference_forward(ref, *inputs)
        got = ours(*inputs)
    assert_matches_reference(got, expected, f"UNet forward, {name} config")


def test_odd_latent_size_matches_diffusers():
    """Latent sides that are not multiples of 4 still line up with their skips."""
    cfg = UNetConfig.tiny()
    ref, ours = make_pair(cfg)
    x, t, context, pooled, time_ids = make_inputs(cfg, size=13)
    x = x[..., :11]  # 13 x 11
    with torch.no_grad():
        expected = reference_forward(ref, x, t, context, pooled, time_ids)
        got = ours(x, t, context, pooled, time_ids)
    assert_matches_reference(got, expected, "UNet forward, 13 x 11 latents")


def test_matches_diffusers_bf16():
    cfg = UNetConfig.tiny()
    ref, ours = make_pair(cfg)
    ref.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    inputs = make_inputs(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference_forward(ref, *inputs).float()
        got = ours(*inputs).float()
    # Both run the same bf16 ops; bf16 keeps 8 bits (2^-8 ~ 4e-3 relative per rounding), so a different
    # summation order anywhere moves the output by a few of those: allow 1e-2.
    assert_matches_reference(got, expected, "UNet forward, bf16", rel=1e-2)


def test_timestep_forms():
    """t may be a python int or float, a 0-d tensor, or one value per sample."""
    cfg = UNetConfig.tiny()
    ours = UNet(cfg).eval()
    x, _, context, pooled, time_ids = make_inputs(cfg)
    with torch.no_grad():
        per_sample = ours(x, torch.tensor([250, 250]), context, pooled, time_ids)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250.0, 250.0])):
            assert torch.equal(ours(x, t, context, pooled, time_ids), per_sample)


def test_timestep_embedding_is_fp32():
    """In bf16 the timestep 999 would round to 1000; the embedding is computed in fp32 first."""
    from minsdxl.unet import timestep_embedding

    emb = timestep_embedding(torch.tensor([999], dtype=torch.int64), 320)
    assert emb.dtype == torch.float32
    assert not torch.equal(emb, timestep_embedding(torch.tensor([1000]), 320))


def test_perturbed_weight_breaks_parity():
    """The parity check is sensitive: one changed weight deep in the network shows."""
    cfg = UNetConfig.tiny()
    ref, ours = make_pair(cfg)
    with torch.no_grad():
        ours.up_blocks[1].attentions[0].transformer_blocks[0].ff.net[2].weight[0, 0] += 1e-2
    inputs = make_inputs(cfg)
    with torch.no_grad():
        expected = reference_forward(ref, *inputs)
        got = ours(*inputs)
    assert (got - expected).abs().max().item() > 1e-5 * expected.abs().max().item()


# ------------------------------------------------------------------------------- full-size, meta


def test_sdxl_base_keys_and_shapes_on_meta():
    cfg = UNetConfig.from_diffusers_config(reference_configs.SDXL_BASE)
    assert cfg == UNetConfig.sdxl_base()
    with torch.device("meta"):
        ref = UNet2DConditionModel(**reference_configs.SDXL_BASE)
        ours = UNet(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(our_shapes) == 1680
    assert our_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684
    assert cfg.adm_in_channels == 2816 and cfg.time_embed_dim == 1280


def test_sdxl_refiner_keys_and_shapes_on_meta():
    cfg = UNetConfig.from_diffusers_config(reference_configs.SDXL_REFINER)
    assert cfg == UNetConfig.sdxl_refiner()
    with torch.device("meta"):
        ref = UNet2DConditionModel(**reference_configs.SDXL_REFINER)
        ours = UNet(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(our_shapes) == 1220
    assert our_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == 2_259_526_660
    assert cfg.adm_in_channels == 2560 and cfg.time_embed_dim == 1536


def test_refiner_conditioning_is_1280_pooled_and_five_time_ids():
    """2560 = 1280 pooled + 5 x 256, not 1024 + 6 x 256: the aesthetic score replaces the target size."""
    cfg = UNetConfig.from_diffusers_config(reference_configs.SDXL_REFINER)
    assert cfg.pooled_text_dim == 1280 and cfg.time_ids == REFINER_TIME_IDS and cfg.num_time_ids == 5
    assert cfg.takes_aesthetic_score and not UNetConfig.sdxl_base().takes_aesthetic_score
    assert cfg.cross_attention_dim == 1280 and cfg.transformer_depth == (0, 4, 4, 0) and cfg.mid_transformer_depth == 4
    base = UNetConfig.from_diffusers_config(reference_configs.SDXL_BASE)
    assert base.pooled_text_dim == 1280 and base.time_ids == BASE_TIME_IDS
    # What the pipeline's model_index.json says (requires_aesthetics_score) decides over the widths.
    told = UNetConfig.from_diffusers_config(reference_configs.SDXL_REFINER, aesthetic_score=False)
    assert told.time_ids == BASE_TIME_IDS and told.pooled_text_dim == 1024
    assert UNetConfig.from_diffusers_config(reference_configs.SDXL_BASE, aesthetic_score=True).pooled_text_dim == 1536


def test_to_diffusers_config_round_trips():
    for cfg in CONFIGS.values():
        assert UNetConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    for cfg in (UNetConfig.sdxl_base(), UNetConfig.sdxl_refiner()):
        assert UNetConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg


def test_time_ids_are_checked():
    with pytest.raises(ConfigError, match="time_ids"):
        UNetConfig(time_ids=("original_height", "original_width"))
    ours = UNet(REFINER_LIKE).eval()
    x, t, context, pooled, _ = make_inputs(REFINER_LIKE)
    with pytest.raises(ValueError, match="takes 5 per sample: original_height, .*aesthetic_score"):
        ours(x, t, context, pooled, torch.zeros(2, 6))  # the base's six ids given to a refiner


@pytest.mark.parametrize(
    "config, field",
    [
        (reference_configs.SD15, "addition_time_embed_dim"),
        (reference_configs.SD21, "upcast_attention"),
        (reference_configs.SDXL_BASE | {"use_linear_projection": False}, "use_linear_projection"),
        (reference_configs.SDXL_BASE | {"class_embed_type": "timestep"}, "class_embed_type"),
        (reference_configs.SDXL_BASE | {"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types"),
        (reference_configs.SDXL_BASE | {"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, "up_block_types"),
        (reference_configs.SDXL_BASE | {"layers_per_block": [2, 2, 1]}, "layers_per_block"),
        (reference_configs.SDXL_BASE | {"cross_attention_dim": [2048, 1024, 2048]}, "cross_attention_dim"),
        (reference_configs.SDXL_BASE | {"attention_head_dim": [5, 10]}, "attention_head_dim"),
        (reference_configs.SDXL_BASE | {"attention_head_dim": [5, 10, 7]}, "num_heads"),
    ],
)
def test_unrepresentable_configs_are_refused_by_name(config, field):
    with pytest.raises(ConfigError, match=field):
        UNetConfig.from_diffusers_config(config)


def test_num_attention_heads_takes_precedence():
    cfg = UNetConfig.from_diffusers_config(reference_configs.SDXL_BASE | {"num_attention_heads": [5, 5, 10], "attention_head_dim": 64})
    assert cfg.num_heads == (5, 5, 10)


# --------------------------------------------------------------------------- gradient checkpointing


class TinyAdapter(torch.nn.Module):
    """A stand-in for an injected LoRA: base(x) + up(down(x)), the only trainable weights."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, 2, bias=False)
        self.up = torch.nn.Linear(2, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _adapted_unet(cfg):
    torch.manual_seed(0)
    unet = UNet(cfg)
    unet.requires_grad_(False)
    for module in list(unet.modules()):
        for name in ("attn1", "attn2"):
            attn = getattr(module, name, None)
            if attn is not None:
                attn.to_q = TinyAdapter(attn.to_q)
    return unet


def _grads(unet, inputs):
    out = unet(*inputs)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_gradient_checkpointing_gives_same_outputs_and_adapter_grads():
    cfg = UNetConfig.tiny()
    unet = _adapted_unet(cfg)
    inputs = make_inputs(cfg)  # nothing here requires grad: only the adapters do
    out_plain, grads_plain = _grads(unet, inputs)

    calls = []
    # A pre-hook: recomputation stops as soon as the saved tensors are rebuilt, before post-hooks.
    unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    unet.set_gradient_checkpointing(True)
    out_ckpt, grads_ckpt = _grads(unet, inputs)
    assert len(calls) == 2, "a checkpointed resnet runs again during backward"

    assert torch.equal(out_plain, out_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 0
    for name in grads_plain:
        assert grads_plain[name].abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_full_training_grads():
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    unet = UNet(cfg)
    inputs = make_inputs(cfg)
    inputs[0].requires_grad_(True)
    _, plain = _grads(unet, inputs)
    unet.set_gradient_checkpointing(True)
    _, ckpt = _grads(unet, inputs)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ full size


@pytest.mark.slow
def test_sdxl_base_full_size_matches_diffusers_fp32():
    """2.6B parameters in fp32: the reference and ours share one copy of the weights (10.3 GB)."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**reference_configs.SDXL_BASE).eval()
    with torch.device("meta"):
        ours = UNet(UNetConfig.sdxl_base()).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # same tensors, no copy
    cfg = UNetConfig.sdxl_base()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([999, 17])
    context = torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, cfg.pooled_text_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2)
    with torch.no_grad():
        expected = reference_forward(ref, x, t, context, pooled, time_ids)
        gc.collect()
        got = ours(x, t, context, pooled, time_ids)
    assert_matches_reference(got, expected, "full-size SDXL base UNet forward, fp32")


@pytest.mark.slow
def test_sdxl_refiner_full_size_matches_diffusers_fp32():
    """2.26B parameters in fp32, shared by the reference and ours (9.0 GB); five time ids with the aesthetic score."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**reference_configs.SDXL_REFINER).eval()
    cfg = UNetConfig.sdxl_refiner()
    with torch.device("meta"):
        ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # same tensors, no copy
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([999, 17])
    context = torch.randn(2, 77, 1280, generator=g)
    pooled = torch.randn(2, cfg.pooled_text_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [1024.0, 1024.0, 0.0, 0.0, 2.5]])
    with torch.no_grad():
        expected = reference_forward(ref, x, t, context, pooled, time_ids)
        gc.collect()
        got = ours(x, t, context, pooled, time_ids)
    assert_matches_reference(got, expected, "full-size SDXL refiner UNet forward, fp32")
