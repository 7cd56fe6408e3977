"""Full fine-tuning (--full_finetune): stochastic rounding, the optimizer step fused into backward, and
train.py end to end on the tiny pipeline: the loss goes down, resume is exact (fp32, and bf16 with
stochastic rounding), the outputs load in diffusers and back in minsdxl bitwise, bad flags are named."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train
from minsdxl import UNetConfig, load_text_encoders, load_unet, load_vae
from minsdxl.fused_backward import PerParameterOptimizer
from minsdxl.stochastic_rounding import stochastic_round_
from minsdxl.unet import UNet


# --- stochastic rounding ---------------------------------------------------------------------------------

def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each fp32 value (by truncating its lower 16 bits, then one ulp up)."""
    low = (x.view(torch.int32) & -65536).view(torch.float32)
    high = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return low, high


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, generator=g) + 1.0  # values in [1, 2): neighbours 2^-7 apart
    draws = torch.stack([stochastic_round_(torch.empty(64, dtype=torch.bfloat16), x, g).float() for _ in range(4000)])
    low, high = bf16_neighbours(x)
    assert ((draws == low) | (draws == high)).all()  # always one of the two neighbours
    # The mean of 4000 draws is within 4 standard errors of x: the gap is 2^-7, a draw's std at most half of it.
    tolerance = 4 * 2**-8 / 4000**0.5
    assert (draws.mean(0) - x).abs().max() < tolerance
    nearest = x.bfloat16().float()
    assert (nearest - x).abs().mean() > 10 * (draws.mean(0) - x).abs().mean()  # round-to-nearest is biased per value


def test_stochastic_rounding_keeps_updates_that_nearest_rounding_loses():
    g = torch.Generator().manual_seed(0)
    w_nearest = torch.ones(1000, dtype=torch.bfloat16)
    w_stochastic = torch.ones(1000, dtype=torch.bfloat16)
    update = 1e-4  # under half of bf16's step at 1.0 (2^-7 / 2 = 0.0039)
    for _ in range(500):
        w_nearest = (w_nearest.float() + update).bfloat16()
        stochastic_round_(w_stochastic, w_stochastic.float() + update, g)
    assert (w_nearest == 1.0).all()  # every update lost
    assert abs(w_stochastic.float().mean().item() - (1 + 500 * update)) < 0.002  # 1.05, kept on average


def test_stochastic_rounding_refuses_other_dtypes():
    with pytest.raises(TypeError, match="fp32 into bf16"):
        stochastic_round_(torch.empty(2, dtype=torch.float16), torch.ones(2))


# --- one optimizer per tensor, fused into backward ------------------------------------------------------------

def tiny_batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g),
             torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)) for _ in range(n)]


def make_adamw(groups):
    return torch.optim.AdamW(groups, weight_decay=1e-2)


def make_adafactor(groups):
    from transformers.optimization import Adafactor
    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=1e-2)


def train_tiny(mode: str, make, steps: int = 3, base: UNet | None = None, clip: float = 0.0):
    """`steps` steps of the tiny UNet (fp32, with gradient checkpointing): one optimizer over every weight
    ("plain", the reference), or one per tensor stepped after backward ("unfused") or inside it ("fused")."""
    torch.manual_seed(0)
    model = copy.deepcopy(base) if base is not None else UNet(UNetConfig.tiny())
    model.requires_grad_(True).set_gradient_checkpointing(True)
    named = dict(model.named_parameters())
    if mode == "plain":
        opt = make([{"params": list(named.values()), "lr": 1e-3}])
    else:
        opt = PerParameterOptimizer(named, make, 1e-3)
        if mode == "fused":
            opt.fuse(clip)
    for x, t, context, pooled, time_ids in tiny_batches(steps):
        model(x, t, context, pooled, time_ids).pow(2).mean().backward()
        if mode != "fused":
            assert all(p.grad is not None for p in named.values())  # the whole set of gradients exists here
            if clip:
                for p in named.values():
                    torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
            opt.zero_grad()
        else:
            assert all(p.grad is None for p in named.values())  # each was freed in backward, after its update
    return model, opt


@pytest.mark.parametrize("make", [make_adamw, make_adafactor], ids=["adamw", "adafactor"])
def test_fused_and_unfused_steps_give_the_weights_of_one_plain_optimizer(make):
    plain = train_tiny("plain", make)[0].state_dict()
    for mode in ("unfused", "fused"):
        got = train_tiny(mode, make)[0].state_dict()
        assert all(torch.equal(got[k], plain[k]) for k in plain), mode  # fp32, no rounding: bitwise
    torch.manual_seed(0)
    untrained = UNet(UNetConfig.tiny()).state_dict()
    assert all(not torch.equal(untrained[k], plain[k]) for k in plain)  # every weight moved


def test_fused_step_clips_each_gradient_on_its_own():
    plain = train_tiny("unfused", make_adamw, clip=1e-3)[0].state_dict()  # per-tensor clipping, done by hand
    fused = train_tiny("fused", make_adamw, clip=1e-3)[0].state_dict()
    assert all(torch.equal(fused[k], plain[k]) for k in plain)


def test_per_parameter_state_dict_resumes_exactly():
    torch.manual_seed(0)
    base = UNet(UNetConfig.tiny())
    straight, _ = train_tiny("fused", make_adafactor, steps=4, base=base)
    first, opt = train_tiny("fused", make_adafactor, steps=2, base=base)
    sd = copy.deepcopy(opt.state_dict())
    # A fresh model and optimizer from the saved weights and state, then the last two batches.
    second = UNet(UNetConfig.tiny())
    second.load_state_dict(first.state_dict())
    second.requires_grad_(True).set_gradient_checkpointing(True)
    opt2 = PerParameterOptimizer(dict(second.named_parameters()), make_adafactor, 1e-3)
    opt2.load_state_dict(sd)
    opt2.fuse(0.0)
    for x, t, context, pooled, time_ids in tiny_batches(4)[2:]:
        second(x, t, context, pooled, time_ids).pow(2).mean().backward()
    a, b = straight.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="state is for 1 tensors"):
        opt2.load_state_dict({"state": {}, "param_groups": [sd["param_groups"][0]]})


# --- train.py --full_finetune on the tiny pipeline -----------------------------------------------------------------

def run(tmp_path, name, *extra, steps=3):
    args = train.parse_args(["--demo", "--full_finetune", "--output_dir", str(tmp_path / name),
                             "--max_train_steps", str(steps), *extra])
    return train.main(args), tmp_path / name


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """100 steps of `train.py --demo --full_finetune` (fp32 on the CPU: Adafactor, fused step), batch 2."""
    tmp = tmp_path_factory.mktemp("full")
    return run(tmp, "demo", "--train_batch_size", "2", "--learning_rate", "1e-4", "--checkpointing_steps", "100",
               steps=100)


def test_full_finetuning_lowers_the_loss(trained):
    summary, out = trained
    loss = losses(out)
    assert summary["step"] == 100 and len(loss) == 100
    first, last = sum(loss[:20]) / 20, sum(loss[-20:]) / 20
    assert last < 0.8 * first, (first, last)
    state = json.loads((out / "checkpoint-100" / "state.json").read_text())
    assert state["args"]["optimizer"] == "adafactor" and state["args"]["fused_backward_pass"] is True
    assert (out / "checkpoint-100" / "weights.safetensors").is_file()  # every UNet weight, not adapters


def test_outputs_load_in_diffusers_and_back_bitwise(trained):
    from diffusers import UNet2DConditionModel
    _, out = trained
    ours = load_unet(out / "unet")
    ref = UNet2DConditionModel.from_pretrained(str(out / "unet")).eval()
    sd_ref = ref.state_dict()
    assert all(torch.equal(v, sd_ref[k]) for k, v in ours.state_dict().items())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    pooled, tid = torch.randn(1, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        mine = ours(x, torch.tensor([500]), ctx, pooled, tid)
        theirs = ref(x, torch.tensor([500]), ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # The single file: the same UNet bitwise, and the base model's own text encoders and VAE.
    single = out / "demo.safetensors"
    back = load_unet(single).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in ours.state_dict().items())
    base = out / "demo-model"
    assert not torch.equal(load_unet(base).state_dict()["conv_in.weight"], back["conv_in.weight"])  # it trained
    for a, b in zip(load_text_encoders(base), load_text_encoders(single)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("position_ids"))
    va, vb = load_vae(base).state_dict(), load_vae(single).state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    with safe_open(str(single), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"model", "conditioner", "first_stage_model"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and meta["minsdxl.partial"] == "false"


def test_resume_is_exact_in_fp32(tmp_path):
    run(tmp_path, "straight", "--checkpointing_steps", "3", "--use_ema", "--ema_on_cpu", steps=6)
    run(tmp_path, "resumed", "--checkpointing_steps", "3", "--use_ema", "--ema_on_cpu", steps=3)
    run(tmp_path, "resumed", "--checkpointing_steps", "3", "--use_ema", "--ema_on_cpu", "--resume_from_checkpoint",
        "latest", steps=6)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_with_stochastic_rounding_resumes_exactly_and_keeps_small_updates(tmp_path):
    """bf16 weights on the CPU; a learning rate whose updates are mostly under half a bf16 step."""
    flags = ("--mixed_precision", "bf16", "--checkpointing_steps", "2", "--learning_rate", "1e-5",
             "--optimizer", "adamw", "--adam_weight_decay", "0")
    run(tmp_path, "straight", *flags, steps=4)
    run(tmp_path, "resumed", *flags, steps=2)
    run(tmp_path, "resumed", *flags, "--resume_from_checkpoint", "latest", steps=4)
    rng = load_file(str(tmp_path / "resumed" / "checkpoint-2" / "rng.safetensors"))
    assert "generator.stochastic_rounding" in rng  # the rounding's random stream is part of the checkpoint
    read = lambda name: load_file(str(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
    a, b = read("straight"), read("resumed")
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a) and a["conv_in.weight"].dtype == torch.bfloat16
    # The same run rounding to nearest: updates of lr 1e-5 (Adam's step is about lr) are lost on most weights.
    run(tmp_path, "nearest", *flags, "--no-stochastic_rounding", steps=4)
    base = load_unet(tmp_path / "straight" / "demo-model", dtype=torch.bfloat16).state_dict()
    moved = lambda sd: sum((sd[k] != base[k]).sum().item() for k in base) / sum(v.numel() for v in base.values())
    nearest = read("nearest")
    print(f"weights changed by 4 steps at lr 1e-5: nearest {moved(nearest):.3f}, stochastic {moved(a):.3f}")
    # measured: nearest 0.066 (the smallest weights, whose bf16 step is small enough), stochastic 0.231
    assert moved(nearest) < 0.1 and moved(a) > 2 * moved(nearest), (moved(nearest), moved(a))


# --- what is refused ------------------------------------------------------------------------------------------------------

# diffusers' README command for train_text_to_image_sdxl.py (full fine-tuning), flags unchanged.
DIFFUSERS_SDXL_COMMAND = """
  --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0
  --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix
  --dataset_name=lambdalabs/naruto-blip-captions --enable_xformers_memory_efficient_attention
  --resolution=512 --center_crop --random_flip --proportion_empty_prompts=0.2 --train_batch_size=1
  --gradient_accumulation_steps=4 --gradient_checkpointing --max_train_steps=10000 --use_8bit_adam
  --learning_rate=1e-06 --lr_scheduler=constant --lr_warmup_steps=0 --mixed_precision=fp16 --report_to=wandb
  --validation_prompt=a_cute_Sundar_Pichai_creature --validation_epochs=5 --checkpointing_steps=5000
  --output_dir=sdxl-naruto-model
""".split()


def test_the_diffusers_full_finetuning_command_line(capsys):
    with pytest.raises(SystemExit, match=r"--mixed_precision fp16 cannot be combined with --full_finetune.*bf16"):
        train.check_args(train.parse_args(DIFFUSERS_SDXL_COMMAND + ["--full_finetune"]))
    args = train.parse_args(DIFFUSERS_SDXL_COMMAND + ["--full_finetune", "--mixed_precision", "bf16"])
    train.check_args(args)  # every other flag of it is accepted
    assert args.optimizer == "adamw8bit" and args.caption_dropout == 0.2 and args.fused_backward_pass is False
    assert "not fused into it (--gradient_accumulation_steps 4" in capsys.readouterr().out


BASE = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]


@pytest.mark.parametrize("argv, message", [
    (["--full_finetune", "--rank", "16"], r"--rank cannot be combined with --full_finetune: it shapes LoRA adapters"),
    (["--full_finetune", "--lora_targets", "all"], r"--lora_targets cannot be combined with --full_finetune"),
    (["--full_finetune", "--use_dora"], r"--use_dora cannot be combined"),
    (["--full_finetune", "--train_text_encoder"], r"--train_text_encoder cannot be combined.*text encoders stay frozen"),
    (["--full_finetune", "--fp8_base"], r"--fp8_base cannot be combined.*float8"),
    (["--full_finetune", "--optimizer", "prodigy"], r"--optimizer prodigy cannot be combined.*one tensor at a time"),
    (["--full_finetune", "--fused_backward_pass", "--gradient_accumulation_steps", "2"],
     r"--fused_backward_pass cannot run with --gradient_accumulation_steps 2: .*nothing to accumulate"),
    (["--fused_backward_pass"], r"--fused_backward_pass is for --full_finetune"),
    (["--no-stochastic_rounding"], r"--stochastic_rounding is for --full_finetune"),
])
def test_bad_combinations_name_the_flag(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.check_args(train.parse_args(BASE + argv))


def test_channels_last_is_refused_where_fsdp2_shards(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; FSDP2 shards only contiguous (NCHW) weights
    with pytest.raises(SystemExit, match=r"--channels_last cannot be combined with --full_finetune under torchrun"):
        train.check_args(train.parse_args(BASE + ["--full_finetune", "--channels_last"]))
    args = train.parse_args(BASE + ["--full_finetune"])
    assert not args.channels_last  # the default: NCHW
    train.check_args(args)


def test_full_finetune_defaults_and_its_own_config_file(tmp_path):
    args = train.parse_args(BASE + ["--full_finetune"])
    train.check_args(args)
    assert args.optimizer == "adafactor" and args.fused_backward_pass is True and args.stochastic_rounding
    train.write_config(args, tmp_path / "config.toml")  # (it lists rank = 4 etc.: LoRA's defaults are not refused)
    again = train.parse_args(["--config", str(tmp_path / "config.toml")])
    train.check_args(again)
    assert again.optimizer == "adafactor" and again.full_finetune


def test_validation_shows_the_base_model_made_before_training(tmp_path):
    from PIL import Image
    val = ("--validation_prompt", "a red circle", "--num_validation_images", "1", "--validation_steps", "2",
           "--validation_inference_steps", "1", "--checkpointing_steps", "2")
    _, out = run(tmp_path, "val", *val, steps=2)
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size == (2 * 64, 20 + 64 + 16)  # base (made at step 0) | fine-tuned
    assert grid.crop((0, 36, 64, 100)).tobytes() != grid.crop((64, 36, 128, 100)).tobytes()
    run(tmp_path, "val", *val, "--resume_from_checkpoint", "latest", steps=4)  # the base model is gone now
    assert Image.open(out / "validation" / "step-000004.png").size == (64, 20 + 64 + 16)  # fine-tuned only
