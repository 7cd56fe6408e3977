"""The training recipes of the seed documents, through train.main on the tiny pipeline (CPU, fp32):
each technique trains, saves and loads; optional dependencies give their install hint; validation,
reporting, the run summary and config files work."""

import json
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lora
import train
from minsdxl import load_text_encoders, load_unet
from minsdxl.lora_files import load_sdxl_lora


def run(tmp_path, name, *extra, steps=3):
    args = train.parse_args(["--demo", "--output_dir", str(tmp_path / name), "--max_train_steps", str(steps), *extra])
    return train.main(args), tmp_path / name


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def lora_changes_the_unet(out_dir, text_encoders=None):
    """The saved kohya file loads strictly into a fresh UNet and changes its output."""
    unet = load_unet(out_dir / "demo-model")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    pooled, tid = torch.randn(1, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    with torch.no_grad():
        before = unet(x, torch.tensor([500]), ctx, pooled, tid)
        assert load_sdxl_lora(unet, out_dir / "lora_kohya.safetensors", text_encoders=text_encoders).unused == []
        after = unet(x, torch.tensor([500]), ctx, pooled, tid)
    return (after - before).abs().max() > 0


TECHNIQUES = {
    "min_snr": ["--snr_gamma", "5"],
    "noise_offset": ["--noise_offset", "0.1"],
    "v_prediction": ["--prediction_type", "v_prediction"],
    "caption_dropout": ["--caption_dropout", "0.5"],
    "self_attention_only": ["--lora_targets", "self_attn"],
    "cross_attention_only": ["--lora_targets", "cross_attn"],
    "dora": ["--use_dora"],
    "locon_everything": ["--lora_targets", "all", "--conv_rank", "4", "--conv_alpha", "2"],
    "dropouts": ["--lora_dropout", "0.1", "--rank_dropout", "0.5", "--module_dropout", "0.2"],
    "gaussian_init": ["--init_lora_weights", "gaussian"],
    "adafactor": ["--optimizer", "adafactor"],
    "timestep_bias": ["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2"],
    "bucketing_accumulation": ["--bucketing", "--gradient_accumulation_steps", "2", "--scale_lr"],
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_each_technique_trains_saves_and_loads(tmp_path, name):
    summary, out = run(tmp_path, name, *TECHNIQUES[name])
    assert summary["step"] == 3 and all(torch.isfinite(torch.tensor(losses(out))))
    assert lora_changes_the_unet(out)


def test_prodigy(tmp_path):
    pytest.importorskip("prodigyopt")  # a test dependency; the hint when it is missing is tested below
    summary, out = run(tmp_path, "prodigy", "--optimizer", "prodigy", "--learning_rate", "1.0", "--checkpointing_steps", "2")
    assert lora_changes_the_unet(out)
    run(tmp_path, "prodigy", "--optimizer", "prodigy", "--learning_rate", "1.0", "--resume_from_checkpoint", "latest", steps=4)


def test_targets_choose_the_modules(tmp_path):
    keys = {}
    for preset in ("self_attn", "cross_attn", "attn_ff"):
        _, out = run(tmp_path, preset, "--lora_targets", preset, steps=1)
        keys[preset] = set(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert keys["self_attn"] and all(".attn1." in k for k in keys["self_attn"])
    assert keys["cross_attn"] and all(".attn2." in k for k in keys["cross_attn"])
    assert any(".ff.net.2." in k for k in keys["attn_ff"])


def test_locon_adapts_resnet_convs(tmp_path):
    _, out = run(tmp_path, "locon", "--lora_targets", "all", "--conv_rank", "4", steps=1)
    keys = set(load_file(str(out / "lora_kohya.safetensors")))
    assert any("in_layers_2" in k for k in keys)  # a resnet's first 3x3 conv, in SGM names
    down = next(v for k, v in load_file(str(out / "lora_kohya.safetensors")).items() if "in_layers_2.lora_down" in k)
    assert down.shape[1:] == (down.shape[1], 3, 3) and down.shape[0] == 4


def test_noise_offset_shifts_each_channel_mean():
    g = torch.Generator().manual_seed(0)
    plain = train.training_noise((64, 4, 16, 16), 0.0, g)
    shifted = train.training_noise((64, 4, 16, 16), 0.5, g)
    # per-image, per-channel means: std 1/16 for plain N(0,1) noise; sqrt(1/256 + 0.25) with the offset
    assert plain.mean(dim=(2, 3)).std() < 0.1 < 0.4 < shifted.mean(dim=(2, 3)).std() < 0.6


def test_text_encoder_training(tmp_path, capsys):
    summary, out = run(tmp_path, "te", "--train_text_encoder", "--text_encoder_lr", "5e-4", "--checkpointing_steps", "3")
    assert "computed every step instead of cached" in capsys.readouterr().out
    assert not (out / "cache" / "text").exists()
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    assert all(v.abs().sum() > 0 for k, v in kohya.items() if k.startswith("lora_te") and "lora_up" in k)
    diffusers_keys = set(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert any(k.startswith("text_encoder_2.") for k in diffusers_keys)
    tes = load_text_encoders(out / "demo-model")
    assert lora_changes_the_unet(out, text_encoders=tes) and lora.lora_layers(tes[0])
    state = json.loads((out / "checkpoint-3" / "state.json").read_text())
    assert [g["lr"] for g in state["param_groups"]] == [1e-3, 5e-4]  # the UNet's and the text encoders' lr
    assert not any("layers_1_" in k for k in kohya if k.startswith("lora_te1_"))  # te1's unused last layer (of 2)


def test_ema_is_saved_and_resumes_exactly(tmp_path):
    ema = ("--use_ema", "--ema_decay", "0.5", "--checkpointing_steps", "2", "--ema_on_cpu")
    run(tmp_path, "straight", *ema, steps=4)
    ckpt = load_file(str(tmp_path / "straight" / "checkpoint-4" / "adapters.safetensors"))
    name = next(k for k in ckpt if k.startswith("ema.") and "lora_up" in k)
    assert not torch.equal(ckpt[name], ckpt[name[4:]])  # the average lags the weights
    run(tmp_path, "resumed", *ema, steps=2)
    run(tmp_path, "resumed", *ema, "--resume_from_checkpoint", "latest", steps=4)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the saved file holds the EMA weights, not the last ones (lora_B folds in the scale, 1 here)
    module = name[4:].removesuffix(".lora_up.weight")
    saved = next(v for k, v in a.items() if k.endswith(module.replace("unet.", "") + ".lora_B.weight"))
    torch.testing.assert_close(saved, ckpt[name])


def test_validation_images_and_training_unchanged(tmp_path):
    val = ("--validation_prompt", "a red circle", "--num_validation_images", "2", "--validation_steps", "2",
           "--validation_inference_steps", "2")
    summary, out = run(tmp_path, "val", *val, steps=4)
    names = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert names == ["step-000002.png", "step-000004.png"]  # the last step's grid is not made twice
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size == (2 * 64, 20 + 2 * (64 + 16))  # 2 seeds; base | LoRA
    base = lambda p: Image.open(p).crop((0, 20, 64, grid.size[1])).tobytes()
    assert base(out / "validation" / "step-000002.png") == base(out / "validation" / "step-000004.png")
    _, plain = run(tmp_path, "plain", steps=4)
    assert losses(out) == losses(plain)  # validation draws no training randomness


def test_summary_debug_loss_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    summary, out = run(tmp_path, "tb", "--report_to", "tensorboard", "--debug_loss")
    assert list((out / "logs").glob("events.out.tfevents.*"))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 3 and saved["final_loss"] == losses(out)[-1] and saved["peak_memory_bytes"] > 0
    assert str(out / "loss.png") in saved["files"]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert len(record["per_image_loss"]) == 4 and all(k.endswith(".png") for k in record["per_image_loss"])


def test_wandb_gets_scalars_and_images(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **k: calls.append(("init", k)), log=lambda d, step: calls.append(("log", d)),
                                 finish=lambda: calls.append(("finish",)), Image=lambda im: ("image", im.size))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(tmp_path, "wandb", "--report_to", "wandb", "--validation_prompt", "x", "--num_validation_images", "1",
        "--validation_inference_steps", "1", steps=1)
    logged = [c[1] for c in calls if c[0] == "log"]
    assert calls[0][0] == "init" and calls[-1] == ("finish",)
    assert any("loss" in d for d in logged) and any("validation" in d for d in logged)


@pytest.mark.parametrize("module, flags", [("prodigyopt", ["--optimizer", "prodigy"]),
                                           ("tensorboard", ["--report_to", "tensorboard"]),
                                           ("wandb", ["--report_to", "wandb"])])
def test_missing_optional_dependency_gives_the_install_hint(tmp_path, monkeypatch, module, flags):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(SystemExit, match=rf"'{module}' package, which is not installed: pip install"):
        run(tmp_path, "x", *flags, steps=1)


def test_8bit_adam_says_it_needs_cuda(tmp_path):
    with pytest.raises(SystemExit, match="runs on CUDA GPUs only"):
        run(tmp_path, "x", "--use_8bit_adam", steps=1)


def test_config_file_reproduces_a_run(tmp_path):
    (tmp_path / "run.toml").write_text('rank = 4\nlora_targets = "cross_attn"\nseed = 3\nrandom_flip = true\n')
    _, a = run(tmp_path, "a", "--config", str(tmp_path / "run.toml"))
    resolved = (a / "config.toml").read_text()
    assert "rank = 4" in resolved and 'lora_targets = "cross_attn"' in resolved
    _, b = run(tmp_path, "b", "--config", str(a / "config.toml"))  # the command line's output_dir wins
    assert losses(a) == losses(b)
    assert train.parse_args(["--config", str(tmp_path / "run.toml"), "--rank", "8"]).rank == 8
    (tmp_path / "bad.toml").write_text("rnak = 4\n")
    with pytest.raises(SystemExit, match=r"unknown flags \['rnak'\]"):
        train.parse_args(["--config", str(tmp_path / "bad.toml")])
