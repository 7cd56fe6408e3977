"""train.py end to end on the tiny pipeline and the demo data, on the CPU in fp32."""

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import lora
import train
from minsdxl import load_unet
from minsdxl.lora_files import load_sdxl_lora

# diffusers' README command for train_text_to_image_lora_sdxl.py, flags unchanged.
DIFFUSERS_README_COMMAND = """
  --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0
  --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix
  --dataset_name=lambdalabs/naruto-blip-captions --caption_column=text
  --resolution=1024 --random_flip --train_batch_size=1 --num_train_epochs=2 --checkpointing_steps=500
  --learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0 --mixed_precision=fp16 --seed=42
  --output_dir=sd-naruto-model-lora-sdxl --validation_prompt=cute_dragon --report_to=wandb
  --gradient_checkpointing --enable_xformers_memory_efficient_attention --rank=16
""".split()


def run(tmp_path, name, *extra):
    args = train.parse_args(["--demo", "--output_dir", str(tmp_path / name), *extra])
    return train.main(args), tmp_path / name


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's main command: 100 steps of the CPU demo."""
    tmp = tmp_path_factory.mktemp("demo")
    return run(tmp, "demo")


def test_demo_trains_and_writes_every_output(demo):
    summary, out = demo
    assert summary["step"] == 100 and not summary["stopped"]
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "loss.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    loss = losses(out)
    assert len(loss) == 100
    first, last = sum(loss[:25]) / 25, sum(loss[-25:]) / 25
    assert last < first, (first, last)  # the LoRA learns something, even on a random model
    # The LoRA files load into a fresh UNet and change its output.
    unet = load_unet(out / "demo-model")
    assert load_sdxl_lora(unet, out / "lora_kohya.safetensors").unused == []
    assert all(v.abs().sum() > 0 for k, v in load_file(str(out / "pytorch_lora_weights.safetensors")).items() if "lora_B" in k)
    # kohya's metadata, true for this run (what A1111's LoRA cards show)
    meta = lora.read_file(out / "lora_kohya.safetensors")[1]
    assert meta["ss_steps"] == "100" and meta["ss_output_name"] == out.name and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "minsdxl_custom" and sum(json.loads(meta["ss_tag_frequency"]).popitem()[1].values()) > 0
    assert json.loads((out / "summary.json").read_text())["for_comfyui_and_a1111"] == "lora_kohya.safetensors"


def test_resume_is_exact(tmp_path):
    straight, a = run(tmp_path, "straight", "--max_train_steps", "6", "--checkpointing_steps", "3")
    first, b = run(tmp_path, "resumed", "--max_train_steps", "3", "--checkpointing_steps", "3")
    assert first["step"] == 3 and (b / "checkpoint-3").is_dir()
    (b / "checkpoint-99").mkdir()  # a half-written checkpoint (no state.json) is never "latest"
    second, _ = run(tmp_path, "resumed", "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert second["step"] == 6
    assert losses(a) == losses(b)  # bitwise
    wa, wb = load_file(str(a / "pytorch_lora_weights.safetensors")), load_file(str(b / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fp16_with_grad_scaler_trains_and_resumes_exactly(tmp_path):
    """The T4 path: fp16 frozen weights under autocast, a GradScaler, its loss scale kept in checkpoints."""
    fp16 = ("--mixed_precision", "fp16", "--checkpointing_steps", "2")
    straight, a = run(tmp_path, "straight", "--max_train_steps", "4", *fp16)
    assert all(math.isfinite(x) for x in losses(a)) and len(losses(a)) == 4
    state = json.loads((a / "checkpoint-2" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 1  # the scaler was on (65536 at start, halved on overflow)
    run(tmp_path, "resumed", "--max_train_steps", "2", *fp16)
    run(tmp_path, "resumed", "--max_train_steps", "4", *fp16, "--resume_from_checkpoint", "latest")
    b = tmp_path / "resumed"
    assert losses(a) == losses(b)
    wa, wb = load_file(str(a / "pytorch_lora_weights.safetensors")), load_file(str(b / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)


def test_cached_and_uncached_training_agree(tmp_path):
    cached, a = run(tmp_path, "cached", "--max_train_steps", "4")
    uncached, b = run(tmp_path, "uncached", "--max_train_steps", "4", "--no-cache_latents", "--no-cache_text_embeddings")
    assert (a / "cache" / "latents").is_dir() and not (b / "cache").exists()
    assert losses(a) == losses(b)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from minsdxl.unet import UNet
    real_forward, calls = UNet.forward, {"n": 0}

    def forward(self, *a, **k):
        calls["n"] += 1
        out = real_forward(self, *a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(UNet, "forward", forward)
    with pytest.raises(train.TrainingError, match=r"loss is nan at step 3.*fp16 VAE.*learning rate.*last good checkpoint"):
        run(tmp_path, "nan", "--max_train_steps", "5", "--checkpointing_steps", "2")
    assert [p.name for p in (tmp_path / "nan").glob("checkpoint-*")] == ["checkpoint-2"]


def test_the_diffusers_command_line_parses_unchanged():
    args = train.parse_args(DIFFUSERS_README_COMMAND)
    assert args.rank == 16 and args.mixed_precision == "fp16" and args.random_flip and args.gradient_checkpointing
    train.check_args(args)  # every flag of it is supported
    assert args.validation_prompt == "cute_dragon" and args.report_to == "wandb"


@pytest.mark.parametrize("argv,message", [
    (["--train_data_dir", "x"], "--pretrained_model_name_or_path is required"),
    (["--pretrained_model_name_or_path", "m"], "--dataset_name .* or --train_data_dir"),
    (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--resolution", "1000"], "multiple of 64"),
    (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--push_to_hub"], "--push_to_hub .*not supported yet"),
    (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--rank_dropout", "1.5"], "--rank_dropout 1.5 must be in"),
    (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--timestep_bias_strategy", "later",
      "--timestep_bias_multiplier", "0"], "--timestep_bias_multiplier 0.0 must be positive"),
])
def test_bad_flags_are_named(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.check_args(train.parse_args(argv))


def test_bad_model_and_data_paths_are_clear_errors(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match=r"model.ckpt: a pickle checkpoint"):
        train.main(train.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "model.ckpt"),
                                     "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "o")]))


def test_lr_schedules_match_diffusers():
    from diffusers.optimization import get_scheduler
    for name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        args = train.parse_args(["--lr_scheduler", name, "--lr_warmup_steps", "5", "--learning_rate", "0.1"])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=40)
        for step in range(40):
            assert abs(opt.param_groups[0]["lr"] - 0.1 * train.lr_factor(step, args, 40)) < 1e-9, (name, step)
            opt.step()
            sched.step()
