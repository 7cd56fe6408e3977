"""The UNet's configuration: one dataclass, its presets, and the bridge from diffusers' config.json.

SDXL's UNet is described in Podell et al., "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis" (2023), section 2.1 (the base) and 2.5 (the refiner). The defaults
below are those of `stabilityai/stable-diffusion-xl-base-1.0`; `sdxl_refiner()` gives
`stabilityai/stable-diffusion-xl-refiner-1.0` (see ../shared/SDXL_FACTS.md). diffusers describes the
same networks in `unet/config.json`, which `UNetConfig.from_diffusers_config` reads.

The two models differ in what conditions them besides the text. Both add a vector of "time ids",
each turned into sinusoidal features, to the timestep embedding: the base takes six (original size,
crop corner, target size), the refiner five (original size, crop corner, and an aesthetic score in
place of the target size). `UNetConfig.time_ids` names them; generation builds them from it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field


class ConfigError(ValueError):
    """A config that this UNet cannot represent; the message names the field."""


# What the added conditioning's time ids are, in the order the model reads them (SGM's conditioner
# embedders: original_size_as_tuple, crop_coords_top_left, then target_size_as_tuple or aesthetic_score).
BASE_TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
REFINER_TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "aesthetic_score")


@dataclass
class UNetConfig:
    """Shape of an SDXL-family UNet. Levels are numbered from the full-resolution one (0) down."""

    in_channels: int = 4  # latent channels produced by the VAE encoder
    out_channels: int = 4  # the UNet predicts noise with the latent's shape
    block_out_channels: tuple[int, ...] = (320, 640, 1280)  # channels at each resolution level
    layers_per_block: int = 2  # resnets per down level; each up level has one more (it eats the extra skip)
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # transformer blocks after each resnet of a level; 0 = no attention
    mid_transformer_depth: int = 10  # transformer blocks in the mid block's single attention
    num_heads: tuple[int, ...] = (5, 10, 20)  # attention heads per level (head dim = channels / heads = 64)
    cross_attention_dim: int = 2048  # text tokens: 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG) features
    pooled_text_dim: int = 1280  # pooled, projected output of text encoder 2
    addition_time_embed_dim: int = 256  # sinusoidal features per time id
    time_ids: tuple[str, ...] = BASE_TIME_IDS  # the time ids it takes, in order: BASE_TIME_IDS or REFINER_TIME_IDS
    norm_num_groups: int = 32  # GroupNorm groups in resnets and before each transformer
    norm_eps: float = 1e-5  # GroupNorm eps in resnets and LayerNorm eps in transformer blocks

    # Derived in __post_init__ (not constructor arguments).
    time_embed_dim: int = field(init=False)  # 4 x base channels = 1280: the vector every resnet receives
    num_time_ids: int = field(init=False)  # 6 (base) or 5 (refiner)
    adm_in_channels: int = field(init=False)  # 2816 = 1280 pooled text + 6 x 256 time-id features (refiner: 1280 + 5 x 256 = 2560)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.transformer_depth = tuple(self.transformer_depth)
        self.num_heads = tuple(self.num_heads)
        self.time_ids = tuple(self.time_ids)
        if self.time_ids not in (BASE_TIME_IDS, REFINER_TIME_IDS):
            raise ConfigError(f"time_ids is {self.time_ids}; minsdxl knows SDXL base's {BASE_TIME_IDS} and the "
                              f"refiner's {REFINER_TIME_IDS}")
        levels = len(self.block_out_channels)
        for name in ("transformer_depth", "num_heads"):
            if len(getattr(self, name)) != levels:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries but block_out_channels has {levels} levels")
        for level, (channels, depth, heads) in enumerate(zip(self.block_out_channels, self.transformer_depth, self.num_heads)):
            if channels % self.norm_num_groups:
                raise ConfigError(f"block_out_channels[{level}]={channels} is not divisible by norm_num_groups={self.norm_num_groups}")
            if (depth > 0 or level == levels - 1) and channels % heads:
                raise ConfigError(f"block_out_channels[{level}]={channels} is not divisible by num_heads[{level}]={heads}")
        self.time_embed_dim = 4 * self.block_out_channels[0]
        self.num_time_ids = len(self.time_ids)
        self.adm_in_channels = self.pooled_text_dim + self.num_time_ids * self.addition_time_embed_dim

    @property
    def takes_aesthetic_score(self) -> bool:
        """True for the refiner: its last time id is an aesthetic score, not the target size."""
        return self.time_ids == REFINER_TIME_IDS

    # ---------------------------------------------------------------------------------------- presets

    @classmethod
    def sdxl_base(cls) -> "UNetConfig":
        """stabilityai/stable-diffusion-xl-base-1.0: 2,567,463,684 parameters."""
        return cls()

    @classmethod
    def sdxl_refiner(cls) -> "UNetConfig":
        """stabilityai/stable-diffusion-xl-refiner-1.0: 2,259,526,660 parameters.

        Where it differs from the base: four levels, wider (384 base channels) and with no attention at
        either end; 4 transformer blocks wherever there is attention; text from OpenCLIP bigG alone (its
        penultimate layer, 1280 wide); an aesthetic score instead of the target size."""
        return cls(
            block_out_channels=(384, 768, 1536, 1536),
            transformer_depth=(0, 4, 4, 0),
            mid_transformer_depth=4,
            num_heads=(6, 12, 24, 24),  # head dim 64 everywhere, as in the base
            cross_attention_dim=1280,  # OpenCLIP ViT-bigG only: the refiner has no CLIP ViT-L
            time_ids=REFINER_TIME_IDS,  # 2560 = 1280 pooled text + 5 x 256
        )

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """SDXL's topology (3 levels, attention on levels 1-2, GEGLU transformers) at 3.06M parameters."""
        return cls(
            block_out_channels=(32, 64, 64),
            transformer_depth=(0, 1, 2),
            mid_transformer_depth=2,
            num_heads=(2, 2, 2),  # head dim 32 at every level with attention
            cross_attention_dim=64,  # tiny text encoders of width 32 + 32
            pooled_text_dim=32,
            addition_time_embed_dim=8,
            norm_num_groups=8,
        )

    @classmethod
    def tiny_refiner(cls) -> "UNetConfig":
        """The refiner's topology (4 levels, attention on the middle two, one text encoder, the aesthetic
        score) at 3.13M parameters, for minsdxl.tiny's refiner."""
        return cls(
            block_out_channels=(32, 64, 64, 64),
            transformer_depth=(0, 1, 1, 0),
            mid_transformer_depth=1,
            num_heads=(2, 2, 2, 2),
            cross_attention_dim=32,  # the tiny text encoder 2 alone
            pooled_text_dim=32,
            addition_time_embed_dim=8,
            time_ids=REFINER_TIME_IDS,
            norm_num_groups=8,
        )

    # ------------------------------------------------------------------------- diffusers config.json

    @classmethod
    def from_diffusers_config(cls, d: dict, aesthetic_score: bool | None = None) -> "UNetConfig":
        """Read a diffusers `UNet2DConditionModel` config (unet/config.json) of the SDXL family.

        `aesthetic_score`: whether the model takes the refiner's time ids, as the pipeline's
        model_index.json says (`requires_aesthetics_score`); when None, `time_ids_from_widths` decides.

        Raises ConfigError naming the field when the config describes something this UNet does not
        implement (SD 1.x/2.x conditioning, class embeddings, other block types, ...).
        """
        for key, allowed in _DIFFUSERS_FIXED.items():
            if key in d and d[key] not in allowed:
                raise ConfigError(
                    f"unet config field {key!r} is {d[key]!r}; minsdxl implements only {allowed[0]!r} "
                    f"(the SDXL family). This config is not an SDXL UNet."
                )
        unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_FIXED and k not in _DIFFUSERS_READ)
        if unknown:
            warnings.warn(f"unet config: ignoring fields minsdxl does not know: {unknown}")

        down_types = list(d.get("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")))
        up_types = list(d.get("up_block_types", ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")))
        levels = len(down_types)
        has_attention = []
        for i, kind in enumerate(down_types):
            if kind not in ("DownBlock2D", "CrossAttnDownBlock2D"):
                raise ConfigError(f"unet config field 'down_block_types'[{i}] is {kind!r}; expected DownBlock2D or CrossAttnDownBlock2D")
            has_attention.append(kind == "CrossAttnDownBlock2D")
        if len(up_types) != levels:
            raise ConfigError(f"unet config: up_block_types has {len(up_types)} entries, down_block_types {levels}")
        for i, kind in enumerate(up_types):
            mirror = has_attention[levels - 1 - i]
            expected = "CrossAttnUpBlock2D" if mirror else "UpBlock2D"
            if kind != expected:
                raise ConfigError(f"unet config field 'up_block_types'[{i}] is {kind!r}; minsdxl needs it to mirror down_block_types ({expected!r})")

        def per_level(name: str, value):
            values = [value] * levels if isinstance(value, int) else list(value)
            if len(values) != levels:
                raise ConfigError(f"unet config field {name!r} has {len(values)} entries for {levels} levels")
            return values

        channels = per_level("block_out_channels", d.get("block_out_channels", (320, 640, 1280)))
        layers = per_level("layers_per_block", d.get("layers_per_block", 2))
        if len(set(layers)) != 1:
            raise ConfigError(f"unet config field 'layers_per_block' is {layers}; minsdxl needs the same count at every level")
        depth = per_level("transformer_layers_per_block", d.get("transformer_layers_per_block", 1))
        if any(isinstance(x, (list, tuple)) for x in depth):
            raise ConfigError("unet config field 'transformer_layers_per_block' has nested lists; minsdxl needs one depth per level")
        # diffusers' `attention_head_dim` is really the head count when `num_attention_heads` is
        # absent (a documented naming bug kept for backward compatibility).
        heads_value = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = per_level("attention_head_dim/num_attention_heads", heads_value)
        cross = d.get("cross_attention_dim", 1280)
        if not isinstance(cross, int):
            if len(set(cross)) != 1:
                raise ConfigError(f"unet config field 'cross_attention_dim' is {cross}; minsdxl needs one value for every level")
            cross = cross[0]
        time_dim = d.get("addition_time_embed_dim")
        proj_dim = d.get("projection_class_embeddings_input_dim")
        if not time_dim or not proj_dim:
            raise ConfigError("unet config needs 'addition_time_embed_dim' and 'projection_class_embeddings_input_dim' (SDXL's size conditioning)")
        if aesthetic_score is None:
            time_ids = time_ids_from_widths(proj_dim, time_dim, cross)
        else:
            time_ids = REFINER_TIME_IDS if aesthetic_score else BASE_TIME_IDS
        pooled = proj_dim - len(time_ids) * time_dim
        if pooled <= 0:
            raise ConfigError(
                f"unet config: projection_class_embeddings_input_dim={proj_dim} leaves no room for the pooled text "
                f"after {len(time_ids)} time ids x addition_time_embed_dim={time_dim}"
            )
        if d.get("norm_num_groups") is None and "norm_num_groups" in d:
            raise ConfigError("unet config field 'norm_num_groups' is null; minsdxl needs GroupNorm")
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(channels),
            layers_per_block=layers[0],
            transformer_depth=tuple(n if attn else 0 for n, attn in zip(depth, has_attention)),
            mid_transformer_depth=depth[-1],
            num_heads=tuple(heads),
            cross_attention_dim=cross,
            pooled_text_dim=pooled,
            addition_time_embed_dim=time_dim,
            time_ids=time_ids,
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
        )

    def to_diffusers_config(self) -> dict:
        """The same network as a diffusers `UNet2DConditionModel` config dict (for tests and saving). Which
        time ids it takes is not in it (diffusers keeps that in the pipeline's model_index.json)."""
        has_attention = [n > 0 for n in self.transformer_depth]
        # diffusers has one depth list: levels without attention ignore their entry, and the mid
        # block takes the deepest level's entry, so that entry must equal the mid depth.
        if self.transformer_depth[-1] not in (0, self.mid_transformer_depth):
            raise ConfigError("diffusers cannot express a mid_transformer_depth that differs from the deepest level's depth")
        depths = [n or 1 for n in self.transformer_depth[:-1]] + [self.mid_transformer_depth]
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": depths,
            "attention_head_dim": list(self.num_heads),  # diffusers' name for the head count
            "cross_attention_dim": self.cross_attention_dim,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.adm_in_channels,
            "use_linear_projection": True,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        }

    def to_dict(self) -> dict:
        return asdict(self)


def time_ids_from_widths(adm_in_channels: int, addition_time_embed_dim: int, cross_attention_dim: int) -> tuple[str, ...]:
    """Which time ids a UNet takes, when only its widths are known (a diffusers config without its
    pipeline's model_index.json, or a bare state dict).

    The added conditioning is pooled text + ids x features, and the split is not in the widths alone:
    the refiner's 2560 could be 1280 + 5 x 256 or 1024 + 6 x 256. What tells them apart is the text:
    the refiner's comes from OpenCLIP bigG alone, so its pooled vector is as wide as its context
    (1280 + 5 x 256 with context 1280); the base's context adds CLIP ViT-L's 768 features to bigG's
    (1280 + 6 x 256 with context 2048). The tiny models of minsdxl.tiny follow the same rule."""
    if adm_in_channels - len(REFINER_TIME_IDS) * addition_time_embed_dim == cross_attention_dim:
        return REFINER_TIME_IDS
    return BASE_TIME_IDS


# diffusers config fields that select features minsdxl does not implement: the allowed values
# (first = SDXL's). Anything else is refused with the field's name.
_DIFFUSERS_FIXED: dict[str, tuple] = {
    "addition_embed_type": ("text_time",),
    "use_linear_projection": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "time_embedding_type": ("positional",),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "upcast_attention": (False, None),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "act_fn": ("silu",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "mid_block_scale_factor": (1,),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0.0,),
}

# Fields read by from_diffusers_config (or harmless: sample_size is only a default image size).
_DIFFUSERS_READ = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
    "cross_attention_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "norm_num_groups", "norm_eps", "down_block_types", "up_block_types", "sample_size",
    "addition_embed_type_num_heads",
}
