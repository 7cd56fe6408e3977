"""DreamBooth LoRA (diffusers' train_dreambooth_lora_sdxl.py flags) on the tiny pipeline, CPU, fp32:
diffusers' example command lines run; class images are generated once, seeded, and reused; the prior-
preservation loss is diffusers'; resume stays exact; bad input is named."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import train
from minsdxl import load_text_encoders, load_tokenizers, load_unet, load_vae
from minsdxl.cache import encode_captions, encode_image
from minsdxl.data import make_demo_dataset
from minsdxl.dreambooth import generate_class_images, missing_class_indices
from minsdxl.generate import Models
from minsdxl.schedule import NoiseSchedule
from minsdxl.tiny import write_tiny_pipeline

# diffusers' examples/dreambooth/README_sdxl.md, "Dog toy example", as written (its --push_to_hub is refused
# by name: test_push_to_hub_is_refused_by_name).
DIFFUSERS_DOG_COMMAND = """
  --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 --instance_data_dir=dog
  --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix --output_dir=lora-trained-xl
  --mixed_precision="fp16" --instance_prompt="a photo of sks dog" --resolution=1024 --train_batch_size=1
  --gradient_accumulation_steps=4 --learning_rate=1e-4 --report_to="wandb" --lr_scheduler="constant"
  --lr_warmup_steps=0 --max_train_steps=500 --validation_prompt="A photo of sks dog in a bucket"
  --validation_epochs=25 --seed="0"
"""
# The same with prior preservation, as diffusers' maintainers run it (huggingface/diffusers#7242).
DIFFUSERS_PRIOR_COMMAND = DIFFUSERS_DOG_COMMAND + """
  --with_prior_preservation --class_data_dir="dog_class" --class_prompt="photo of a dog"
"""
# Those command lines on the tiny pipeline: the model, VAE and folders replaced by local ones, and shortened
# (as tests/test_docs.py shortens the docs' commands): 64x64, 2 steps, 3 class images, 1 validation image of
# 2 steps, no wandb. Every other flag is as written.
SHORTER = ["--resolution", "64", "--max_train_steps", "2", "--num_class_images", "3", "--class_inference_steps", "2",
           "--validation_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none"]
PRIOR_ONLY = ("--num_class_images", "--class_inference_steps")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


def instance_folder(path: Path, n: int = 3) -> Path:
    """n pictures of shapes, as a DreamBooth folder holds them: images only."""
    make_demo_dataset(path, n=n, resolution=64, seed=1)
    for caption in path.glob("*.txt"):
        caption.unlink()
    return path


def dreambooth(tmp: Path, tiny: Path, name: str, *extra: str, class_dir: str = "class") -> list[str]:
    """A DreamBooth command line with prior preservation on the tiny pipeline."""
    instance = tmp / "instance" if (tmp / "instance").is_dir() else instance_folder(tmp / "instance")
    return ["--pretrained_model_name_or_path", str(tiny), "--instance_data_dir", str(instance),
            "--instance_prompt", "a photo of sks shape", "--with_prior_preservation", "--class_prompt", "a shape",
            "--class_data_dir", str(tmp / class_dir), "--num_class_images", "4", "--sample_batch_size", "3",
            "--class_inference_steps", "4",
            "--output_dir", str(tmp / name), "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
            "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--max_train_steps", "4", *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ command lines, defaults


@pytest.mark.parametrize("command", [DIFFUSERS_DOG_COMMAND, DIFFUSERS_PRIOR_COMMAND], ids=["dog", "prior"])
def test_diffusers_dreambooth_commands_run_with_only_the_script_name_changed(tmp_path, tiny, command):
    argv = shlex.split(command)
    local = {"--pretrained_model_name_or_path": str(tiny), "--pretrained_vae_model_name_or_path": str(tiny),
             "--instance_data_dir": str(instance_folder(tmp_path / "dog")), "--class_data_dir": str(tmp_path / "dog_class"),
             "--output_dir": str(tmp_path / "out")}
    given = {a.split("=")[0] for a in argv}
    argv += [x for flag, value in local.items() if flag in given for x in (flag, value)]
    argv += [x for i in range(0, len(SHORTER), 2) if SHORTER[i] not in PRIOR_ONLY or "--with_prior_preservation" in given
             for x in SHORTER[i:i + 2]]
    summary = train.main(train.parse_args(argv))
    out = tmp_path / "out"
    assert summary["step"] == 2 and len(losses(out)) == 2 and (out / "lora_kohya.safetensors").is_file()
    assert (out / "validation" / "final.png").is_file()
    classes = sorted(p.name for p in (tmp_path / "dog_class").glob("*.png"))
    if "--with_prior_preservation" in given:
        assert [n.split("-")[0] for n in classes] == ["0", "1", "2"]
    else:
        assert classes == []


def test_push_to_hub_is_refused_by_name(tmp_path):
    args = train.parse_args(shlex.split(DIFFUSERS_DOG_COMMAND) + ["--push_to_hub"])
    with pytest.raises(SystemExit, match=r"--push_to_hub .*not supported yet"):
        train.check_args(args)


def test_dreambooth_takes_the_dreambooth_scripts_defaults(capsys):
    dreambooth_run = train.parse_args(["--instance_prompt", "a photo of sks dog", "--train_batch_size", "2"])
    assert (dreambooth_run.train_batch_size, dreambooth_run.num_train_epochs, dreambooth_run.validation_epochs) == (2, 1, 50)
    assert dreambooth_run.adam_weight_decay == 1e-4 and dreambooth_run.output_dir == "lora-dreambooth-model"
    assert dreambooth_run.caption_column is None and dreambooth_run.text_encoder_lr is None  # (no --train_text_encoder)
    with_te = train.parse_args(["--instance_prompt", "x", "--train_text_encoder"])
    assert (with_te.text_encoder_lr, with_te.adam_weight_decay_text_encoder) == (5e-6, 1e-3)
    text_to_image = train.parse_args(["--train_data_dir", "d"])
    assert (text_to_image.train_batch_size, text_to_image.num_train_epochs, text_to_image.caption_column) == (16, 100, "text")
    train.check_args(train.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                       "--instance_prompt", "x"]))
    assert "train_dreambooth_lora_sdxl.py for the flags not given: --train_batch_size 4 --num_train_epochs 1" in capsys.readouterr().out
    assert "DreamBooth default: 50" in train.build_parser().format_help()


def test_dreambooth_only_flags_of_diffusers_script(monkeypatch):
    """The flags of train_dreambooth_lora_sdxl.py that its text-to-image script lacks, with their meaning."""
    args = train.parse_args(["--optimizer", "AdamW", "--prodigy_decouple", "False", "--prodigy_beta3", "0.99",
                             "--output_kohya_format", "--train_text_encoder", "--adam_weight_decay_text_encoder", "0.5"])
    assert args.optimizer == "adamw" and args.prodigy_decouple is False and args.output_kohya_format
    with pytest.raises(SystemExit):
        train.parse_args(["--prodigy_use_bias_correction", "maybe"])
    unet, te = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    groups = train.optimizer_groups(args, {"a": unet, "te1.b": te}, 1e-4)
    assert groups[1]["weight_decay"] == 0.5 and "weight_decay" not in groups[0]
    made = {}

    class Prodigy(torch.optim.SGD):
        def __init__(self, groups, **kwargs):
            made.update(kwargs)
            super().__init__(groups, lr=1.0)

    monkeypatch.setitem(__import__("sys").modules, "prodigyopt", type("m", (), {"Prodigy": Prodigy}))
    args.optimizer = "prodigy"
    train.make_optimizer(args, [{"params": [unet], "lr": 1.0}], torch.device("cpu"))
    assert (made["decouple"], made["beta3"], made["use_bias_correction"], made["safeguard_warmup"]) == (False, 0.99, True, True)
    with pytest.raises(SystemExit, match="--do_edm_style_training .*not supported yet"):
        train.check_args(train.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                           "--instance_prompt", "x", "--do_edm_style_training"]))


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["--instance_data_dir", "d", "--instance_prompt", "x", "--with_prior_preservation", "--class_data_dir", "c"],
     "--with_prior_preservation needs --class_prompt"),
    (["--instance_data_dir", "d", "--instance_prompt", "x", "--with_prior_preservation", "--class_prompt", "a dog"],
     "--with_prior_preservation needs --class_data_dir"),
    (["--instance_data_dir", "d", "--instance_prompt", "x", "--dataset_name", "n"], "--instance_data_dir and --dataset_name"),
    (["--instance_data_dir", "d", "--instance_prompt", "x", "--train_data_dir", "t"], "--instance_data_dir and --train_data_dir"),
    (["--instance_data_dir", "d"], "--instance_data_dir needs --instance_prompt"),
    (["--train_data_dir", "t", "--instance_prompt", "x"], "--instance_prompt is DreamBooth's, and --train_data_dir"),
    (["--train_data_dir", "t", "--with_prior_preservation", "--class_prompt", "c", "--class_data_dir", "c"],
     "--with_prior_preservation is DreamBooth's"),
    (["--instance_data_dir", "d", "--instance_prompt", "x", "--with_prior_preservation", "--class_prompt", "c",
      "--class_data_dir", "c", "--bucketing"], "--bucketing cannot be combined with --with_prior_preservation"),
    (["--instance_data_dir", "d", "--instance_prompt", "x", "--repeats", "0"], "--repeats 0 must be at least 1"),
])
def test_bad_dreambooth_flags_are_named(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.check_args(train.parse_args(["--pretrained_model_name_or_path", "m", *argv]))


def test_class_flags_without_prior_preservation_warn_visibly(capsys):
    train.check_args(train.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                       "--instance_prompt", "x", "--class_prompt", "a dog", "--class_data_dir", "c"]))
    assert "warning: --class_data_dir, --class_prompt do nothing without --with_prior_preservation" in capsys.readouterr().out


def test_bad_folders_are_named_before_any_model_is_loaded(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(train, "load_encoders", lambda run: pytest.fail("a model was loaded"))
    (tmp_path / "instance").mkdir()
    (tmp_path / "instance" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"--instance_data_dir: no images in .*instance"):
        train.main(train.parse_args(dreambooth(tmp_path, tiny, "empty")))
    instance_folder(tmp_path / "instance")
    with pytest.raises(SystemExit, match=r"--class_data_dir .*inside --instance_data_dir"):
        train.main(train.parse_args(dreambooth(tmp_path, tiny, "inside", class_dir="instance/class")))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match=r"--class_data_dir .*a_file is a file"):
        train.main(train.parse_args(dreambooth(tmp_path, tiny, "out", class_dir="a_file")))


def test_too_few_usable_class_images_is_an_error(tmp_path, tiny):
    (tmp_path / "class").mkdir()
    for i in range(3):
        (tmp_path / "class" / f"{i}-broken.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "class" / "3-good.png")
    with pytest.raises(SystemExit, match=r"--class_data_dir .* has 1 usable class images, fewer than --num_class_images 4"
                                         r"(.|\n)*0-broken.png"):
        train.main(train.parse_args(dreambooth(tmp_path, tiny, "out")))


# ------------------------------------------------------------------------ class images, loss, resume


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, tiny):
    """A DreamBooth run with prior preservation, its class images generated first; every batch_loss call and
    every UNet output of its training steps recorded."""
    tmp = tmp_path_factory.mktemp("prior")
    calls, outputs = [], []
    real_loss, real_forward = train.batch_loss, train.UNet.forward

    def batch_loss(*args):
        loss, per_sample = real_loss(*args)
        calls.append({"args": args, "loss": loss.detach()})
        return loss, per_sample

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:  # (not the class images' generation)
            outputs.append(out.detach())
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "batch_loss", batch_loss)
        m.setattr(train.UNet, "forward", forward)
        summary = train.main(train.parse_args(dreambooth(tmp, tiny, "run", "--snr_gamma", "5")))
    return tmp, summary, calls, outputs


def test_class_images_are_generated_then_reused(prior_run, tiny, monkeypatch):
    tmp, summary, _, _ = prior_run
    made = sorted((tmp / "class").glob("*.png"))
    assert [p.name.split("-")[0] for p in made] == ["0", "1", "2", "3"]  # 2 batches: 3 + 1 (--sample_batch_size 3)
    assert all(Image.open(p).size == (64, 64) for p in made)
    assert not any(p.name.startswith(".") for p in (tmp / "class").iterdir())  # no temporary file left
    stamps = {p: p.stat().st_mtime_ns for p in made}
    # A second run finds them all: nothing is generated, and it trains exactly as the first did.
    monkeypatch.setattr(train, "generate_class_images", lambda *a, **k: pytest.fail("class images were generated again"))
    train.main(train.parse_args(dreambooth(tmp, tiny, "again", "--snr_gamma", "5")))
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp / "class").glob("*.png"))} == stamps
    assert losses(tmp / "again") == losses(tmp / "run")


def test_only_missing_class_images_are_generated_and_seeded(prior_run, tiny, tmp_path):
    tmp, _, _, _ = prior_run
    folder = tmp_path / "class"
    folder.mkdir()
    for p in (tmp / "class").glob("*.png"):
        (folder / p.name).write_bytes(p.read_bytes())
    deleted = next(folder.glob("1-*.png"))
    original = np.asarray(Image.open(deleted), dtype=np.int16)
    deleted.unlink()
    Image.new("RGB", (64, 64), "white").save(folder / "mine.jpg")  # the user's own class image counts too
    assert missing_class_indices(folder, 5) == [1] and missing_class_indices(folder, 6) == [1, 4]
    assert missing_class_indices(folder, 4) == []
    models = Models(load_unet(tiny), load_vae(tiny), load_text_encoders(tiny), load_tokenizers(tiny))
    [again] = generate_class_images(models, "a shape", [1], folder, seed=0, resolution=64, batch_size=3, steps=4,
                                    device=torch.device("cpu"), dtype=torch.float32, progress=False)
    # Index 1's noise is its own seed's, whatever batch it is made in: the same picture (made alone now, in a
    # batch of 3 before: the pixels may differ by a rounding step).
    assert again.name.startswith("1-") and np.abs(np.asarray(Image.open(again), dtype=np.int16) - original).max() <= 1


def test_a_stopped_generation_keeps_the_finished_images(tiny, tmp_path, monkeypatch):
    """Each batch's images are on disk before the next starts, each file whole: a stop loses only its batch."""
    from minsdxl import dreambooth
    real_decode, calls = dreambooth.decode, []

    def decode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch is made
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(dreambooth, "decode", decode)
    models = Models(load_unet(tiny), load_vae(tiny), load_text_encoders(tiny), load_tokenizers(tiny))
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(models, "a shape", [0, 1, 2], tmp_path, seed=0, resolution=64, batch_size=2, steps=2,
                              device=torch.device("cpu"), dtype=torch.float32, progress=False)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["0", "1"]
    assert missing_class_indices(tmp_path, 3) == [2]  # what the next run makes


def test_prior_preservation_batches_pair_instance_and_class_images(prior_run, tiny):
    """Each batch is [instance images with the instance prompt; class images with the class prompt]."""
    tmp, summary, calls, _ = prior_run
    assert summary["step"] == 4 and len(calls) == 4
    vae, tes, tokenizers = load_vae(tiny), load_text_encoders(tiny), load_tokenizers(tiny)
    pixels = lambda p: torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    instance = [encode_image(vae, pixels(p)) for p in sorted((tmp / "instance").glob("*.png"))]  # 64x64: no crop
    classes = [encode_image(vae, pixels(p)) for p in sorted((tmp / "class").glob("*.png"))]
    prompts = {name: encode_captions(tes, tokenizers, [prompt])[0][0] for name, prompt in
               (("instance", "a photo of sks shape"), ("class", "a shape"))}
    for call in calls:
        x0, context, time_ids, prior_weight = call["args"][2], call["args"][5], call["args"][7], call["args"][12]
        assert prior_weight == 1.0 and x0.shape[0] == 4  # --train_batch_size 2, and as many class images
        for half, images, prompt in ((slice(0, 2), instance, "instance"), (slice(2, 4), classes, "class")):
            assert all(any(torch.allclose(z, ref, atol=1e-5) for ref in images) for z in x0[half]), prompt
            torch.testing.assert_close(context[half], prompts[prompt].expand(2, -1, -1))
        assert time_ids[2:].tolist() == [[64.0, 64, 0, 0, 64, 64]] * 2  # a class image's own size and crop


def test_prior_preservation_loss_is_diffusers(prior_run):
    """The run's loss, step by step, recomputed from the same batch (its noise, timesteps and UNet output) as
    diffusers' DreamBooth script computes it, with its Min-SNR fix (#6356: the instance half's timesteps)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    _, _, calls, outputs = prior_run
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for call, model_pred in zip(calls, outputs):
        noise, timesteps = call["args"][3], call["args"][4]
        model_pred, model_pred_prior = torch.chunk(model_pred.float(), 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)  # epsilon prediction
        prior_loss = F.mse_loss(model_pred_prior, target_prior, reduction="mean")
        snr = compute_snr(scheduler, torch.chunk(timesteps, 2, dim=0)[0])
        mse_loss_weights = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(model_pred, target, reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights).mean()
        expected = loss + 1.0 * prior_loss
        torch.testing.assert_close(call["loss"], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("snr_gamma, weight", [(None, 1.0), (None, 0.3), (5.0, 0.7)])
def test_batch_loss_splits_the_batch_as_diffusers(snr_gamma, weight):
    """train.batch_loss on a made-up batch against diffusers' formula, computed independently."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    model = lambda x, t, context, pooled, ids: x * 0.7 + context.mean() + pooled.mean()  # any function of its inputs
    context, pooled, ids = torch.randn(6, 77, 8, generator=g), torch.randn(6, 4, generator=g), torch.zeros(6, 6)
    ours, _ = train.batch_loss(model, NoiseSchedule(), x0, noise, t, context, pooled, ids, torch.device("cpu"),
                               torch.float32, "epsilon", snr_gamma, weight)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    pred, pred_prior = model(scheduler.add_noise(x0, noise, t), t, context, pooled, ids).chunk(2)
    target, target_prior = noise.chunk(2)
    prior_loss = F.mse_loss(pred_prior, target_prior)
    if snr_gamma is None:
        loss = F.mse_loss(pred, target)
    else:
        snr = compute_snr(scheduler, t.chunk(2)[0])
        weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    torch.testing.assert_close(ours, loss + weight * prior_loss, rtol=1e-5, atol=0)


def test_resume_with_prior_preservation_is_exact(prior_run, tiny):
    tmp, _, _, _ = prior_run
    train.main(train.parse_args(dreambooth(tmp, tiny, "resumed", "--snr_gamma", "5", "--max_train_steps", "2")))
    train.main(train.parse_args(dreambooth(tmp, tiny, "resumed", "--snr_gamma", "5", "--resume_from_checkpoint", "latest")))
    assert losses(tmp / "resumed") == losses(tmp / "run")
    a, b = load_file(str(tmp / "run" / "pytorch_lora_weights.safetensors")), load_file(str(tmp / "resumed" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match=r"--class_prompt 'a shape' \(now 'a cube'\)"):
        argv = dreambooth(tmp, tiny, "resumed", "--resume_from_checkpoint", "latest", "--max_train_steps", "6")
        argv[argv.index("a shape")] = "a cube"
        train.main(train.parse_args(argv))


@pytest.mark.parametrize("extra", [["--train_text_encoder"], ["--full_finetune"]], ids=["text_encoders", "full"])
def test_prior_preservation_trains_text_encoders_and_full_models(prior_run, tiny, monkeypatch, extra):
    """The class images' captions go through the trained text encoders too; full fine-tuning takes the same batches."""
    tmp, _, _, _ = prior_run
    monkeypatch.setattr(train, "generate_class_images", lambda *a, **k: pytest.fail("class images were generated again"))
    argv = dreambooth(tmp, tiny, "more-" + extra[0].strip("-"), *extra, "--max_train_steps", "2")
    summary = train.main(train.parse_args(argv))
    assert summary["step"] == 2 and all(np.isfinite(losses(tmp / ("more-" + extra[0].strip("-")))))


def test_memory_simulator_sees_the_doubled_batch_and_the_class_images():
    from minsdxl.memory import parse_args, simulate

    plain = simulate(parse_args(["--demo", "--device", "cpu", "--train_batch_size", "2"])[0])
    doubled = simulate(parse_args(["--demo", "--device", "cpu", "--train_batch_size", "1", "--with_prior_preservation",
                                   "--class_prompt", "a shape", "--sample_batch_size", "2"])[0])
    step = lambda plan: plan.phase("train step").peak
    assert step(doubled) == pytest.approx(step(plain), rel=1e-3)  # batch 1 + 1 class image: the step of batch 2
    assert doubled.phase("class images").by_kind["weights"] > 0 and "class images" not in [p.name for p in plain.phases]
    fp8 = simulate(parse_args(["--demo", "--device", "cpu", "--with_prior_preservation", "--fp8_base"])[0])
    assert fp8.phase("class images").by_kind["weights"] < doubled.phase("class images").by_kind["weights"]
