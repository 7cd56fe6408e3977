"""python -m minsdxl.extract_lora: a rank-r change between two tiny UNets comes back exactly, the files
load in our sampler's loader and in diffusers with the tuned model's effect, what a LoRA cannot hold is
reported, and bad input is a clear error."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from minsdxl import load_unet
from minsdxl.extract_lora import main, truncated_factors
from minsdxl.lora_files import load_sdxl_lora
from minsdxl.model_files import save_diffusers_unet
from minsdxl.tiny import write_tiny_pipeline

CHANGED = {  # layer -> rank of its change: a Linear of attention, a feed-forward Linear, a 3x3 conv (LoCon)
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2,
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2": 3,
    "down_blocks.0.resnets.1.conv2": 2,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny pipeline, and its UNet with a change of known rank in CHANGED's layers, as a unet/ folder."""
    tmp = tmp_path_factory.mktemp("extract")
    base_dir = write_tiny_pipeline(tmp / "base")
    tuned = load_unet(base_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, r in CHANGED.items():
            w = tuned.get_submodule(path).weight
            up, down = torch.randn(w.shape[0], r, generator=g), torch.randn(r, w[0].numel(), generator=g)
            w += 0.05 * (up @ down).reshape(w.shape)  # a change of rank exactly r
    save_diffusers_unet(tuned, tmp / "tuned")
    return base_dir, tmp / "tuned", tuned


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 30]), torch.randn(2, 77, 64, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))


def test_truncated_svd_recovers_a_rank_r_change_exactly():
    g = torch.Generator().manual_seed(0)
    for shape, r in (((64, 48), 3), ((16, 8, 3, 3), 5)):
        delta = (torch.randn(shape[0], r, generator=g) @ torch.randn(r, torch.Size(shape[1:]).numel(), generator=g)).reshape(shape)
        up, down, kept = truncated_factors(delta, rank=r)
        torch.testing.assert_close((up @ down).float().reshape(shape), delta, rtol=0, atol=1e-5)
        assert kept == pytest.approx(1.0, abs=1e-12)
        up, down, kept = truncated_factors(delta, rank=r - 1)  # one singular value short
        assert 0.3 < kept < 0.999 and up.shape[1] == r - 1


def test_extracted_lora_recovers_the_tuned_model_in_ours_and_in_diffusers(models, tmp_path, capsys):
    base_dir, tuned_dir, tuned = models
    assert main(["--base", str(base_dir), "--tuned", str(tuned_dir), "--rank", "4", "--conv_rank", "4",
                 "--output_dir", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "3 layers; of their change 1.0000 of the energy is kept" in said
    x, t, ctx, pooled, tid = inputs()
    with torch.no_grad():
        want = tuned(x, t, ctx, pooled, tid)
        # Ours (what sample.py uses), from the kohya file: the tuned UNet's output.
        ours = load_unet(base_dir)
        before = ours(x, t, ctx, pooled, tid)
        assert load_sdxl_lora(ours, tmp_path / "lora_kohya.safetensors").unused == []
        torch.testing.assert_close(ours(x, t, ctx, pooled, tid), want, rtol=1e-5, atol=1e-5)
        assert (before - want).abs().max() > 1e-3  # (the change is visible)
        # diffusers, from the diffusers file.
        pipe = StableDiffusionXLPipeline.from_pretrained(str(base_dir))
        pipe.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
        theirs = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
    torch.testing.assert_close(theirs, want, rtol=1e-5, atol=1e-5)
    with safe_open(str(tmp_path / "lora_kohya.safetensors"), "pt") as f:
        kept = f.metadata()["minsdxl.kept_energy"]
    assert all(path in kept for path in CHANGED)


def test_a_rank_too_small_and_what_a_lora_cannot_hold_are_reported(models, tmp_path, capsys):
    base_dir, _, tuned = models
    tuned = load_unet(models[1])
    with torch.no_grad():
        tuned.conv_in.bias += 0.1  # a bias, outside the blocks: no LoRA holds it
    save_diffusers_unet(tuned, tmp_path / "tuned")
    main(["--base", str(base_dir), "--tuned", str(tmp_path / "tuned"), "--rank", "1", "--output_dir", str(tmp_path / "o")])
    said = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in said.splitlines() if line.startswith("| ") and "." in line}
    assert "down_blocks.0.resnets.1.conv2" not in rows  # a 3x3 conv: only with --conv_rank ...
    assert "not in the LoRA: 3x3 convs (pass --conv_rank)" in said  # ... and its change is reported
    assert "not in the LoRA: biases and norms" in said
    kept = float(rows["up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"].split(" | ")[2])
    assert 0.2 < kept < 0.99  # rank 1 of a rank-3 change


def test_bad_input_is_a_clear_error(models, tmp_path):
    base_dir = models[0]
    with pytest.raises(SystemExit, match="there is no change to extract"):
        main(["--base", str(base_dir), "--tuned", str(base_dir), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no_such_model"):
        main(["--base", str(base_dir), "--tuned", str(tmp_path / "no_such_model"), "--output_dir", str(tmp_path)])
