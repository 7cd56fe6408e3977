"""The pieces train.py is made of, each on its own (minsdxl.cache, ema, optim, reporting, devices,
stopping, validation, distributed, train_args); train.py end to end is tests/test_train.py."""

import argparse
import json
import os
import signal
import types

import pytest
import torch

from minsdxl import devices
from minsdxl.cache import Cache, Conditioning, content_key, encode_image
from minsdxl.distributed import Distributed
from minsdxl.ema import EMA
from minsdxl.optim import make_optimizer
from minsdxl.reporting import MetricsLog, Reporter, read_metrics, save_loss_plot
from minsdxl.stopping import Interrupted, StopRequest
from minsdxl.train_args import TrainingError, parse_args
from minsdxl.validation import guidance_conditioning


# --- minsdxl.cache ------------------------------------------------------------------------------------

def test_cache_computes_once_and_reads_back_from_disk(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"x": torch.arange(3.0)}
    first = Cache(tmp_path).get("latents", "k1", compute)
    again = Cache(tmp_path).get("latents", "k1", compute)  # a new run: from the file, not computed
    assert calls == [1] and torch.equal(first["x"], again["x"])
    assert [p.name for p in (tmp_path / "latents").iterdir()] == ["k1.safetensors"]  # no .tmp left behind
    assert content_key("model", "image", 0) != content_key("model", "image", 1)


class FakeVAE:
    """encode(x).latent_dist.mean: the pixels' 8x8 means, 4 channels (what encode_image reads of a VAE)."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, value=None):
        self.value = value

    def encode(self, x):
        mean = torch.nn.functional.avg_pool2d(x, 8)[:, :1].repeat(1, 4, 1, 1)
        if self.value is not None:
            mean = torch.full_like(mean, self.value)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean))


def test_encode_image_scales_and_refuses_nan():
    latents = encode_image(FakeVAE(), torch.ones(3, 16, 16))
    assert latents.shape == (4, 2, 2) and torch.allclose(latents, torch.full((4, 2, 2), 0.13025))
    with pytest.raises(TrainingError, match="NaN/inf latents.*fp16-fix"):
        encode_image(FakeVAE(float("nan")), torch.ones(3, 16, 16))


def test_conditioning_keeps_epoch_0s_crop_when_cached(tmp_path):
    seen = []

    class Data:
        def get(self, epoch, i):
            seen.append(epoch)
            return {"pixels": torch.full((3, 16, 16), float(epoch))}

        def key(self, epoch, i):
            return f"{i}|{epoch}"

    cached = Conditioning(Cache(tmp_path), "m", Data(), FakeVAE(), None, None, cache_latents=True, cache_text=True)
    cached.latents(3, 0)
    cached.latents(5, 0)
    assert seen == [0] and cached.aug_epoch(5) == 0  # one crop per image, encoded once
    fresh = Conditioning(Cache(tmp_path / "no"), "m", Data(), FakeVAE(), None, None, cache_latents=False, cache_text=False)
    assert fresh.latents(5, 0).mean() == pytest.approx(5 * 0.13025) and seen[-1] == 5 and not (tmp_path / "no").exists()


# --- minsdxl.ema -----------------------------------------------------------------------------------------

def test_ema_moves_towards_the_weights_geometrically():
    w = {"a": torch.zeros(3)}
    ema = EMA(w, decay=0.9, device="cpu")
    w["a"] += 1.0
    for _ in range(5):
        ema.update(w)
    torch.testing.assert_close(ema.shadow["a"], torch.full((3,), 1 - 0.9**5))
    target = {"a": torch.empty(3)}
    ema.copy_to(target)
    assert torch.equal(target["a"], ema.shadow["a"]) and ema.shadow["a"].dtype == torch.float32


# --- minsdxl.optim -------------------------------------------------------------------------------------------

def test_make_optimizer_builds_the_named_one_and_remembers_base_lr():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    args = parse_args(["--optimizer", "adafactor", "--learning_rate", "3e-4"])
    opt = make_optimizer(args, [{"params": [p], "lr": 3e-4}], torch.device("cpu"))
    from transformers.optimization import Adafactor
    assert isinstance(opt, Adafactor) and opt.param_groups[0]["base_lr"] == 3e-4
    assert opt.defaults["relative_step"] is False and opt.defaults["scale_parameter"] is False  # a fixed lr, as given
    with pytest.raises(SystemExit, match="CUDA GPUs only"):
        make_optimizer(parse_args(["--optimizer", "adamw8bit"]), [], torch.device("cpu"), check_only=True)


# --- minsdxl.reporting ------------------------------------------------------------------------------------------

def test_metrics_log_keeps_the_steps_up_to_the_resumed_one(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    log = MetricsLog(path, 2, True, print)
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path, print)] == [(1, 1), (2, 2), (3, 0.5)]
    assert "line 4: not a complete record" in capsys.readouterr().out
    other_rank = MetricsLog(path, 0, False, print)  # writes nothing, reads nothing
    other_rank.write({"step": 9})
    other_rank.close()
    assert len(read_metrics(path, print)) == 3


def test_loss_plot_and_a_silent_reporter(tmp_path):
    save_loss_plot([1.0, 0.5, 0.25], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    save_loss_plot([1.0], tmp_path / "one.png")  # one point draws nothing
    assert not (tmp_path / "one.png").exists()
    r = Reporter("none", tmp_path, argparse.Namespace())
    r.scalars({"step": 1, "loss": 1.0}, 1)
    r.close()


# --- minsdxl.devices -------------------------------------------------------------------------------------------------

def test_precision_and_autocast_on_the_cpu():
    args = argparse.Namespace(mixed_precision=None)
    assert devices.pick_precision(args, torch.device("cpu")) == torch.float32 and args.mixed_precision == "no"
    assert devices.pick_precision(argparse.Namespace(mixed_precision="bf16"), torch.device("cpu")) == torch.bfloat16
    with devices.autocast(torch.device("cpu"), torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with devices.autocast(torch.device("cpu"), torch.float32):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    meter = devices.PhaseMeter(torch.device("cpu"))
    with meter.phase("outer"), meter.phase("inner"):
        assert meter.stack == ["outer", "inner"]
    assert meter.peaks == {} and devices.peak_memory_bytes(torch.device("cpu")) > 0  # per phase on CUDA only


# --- minsdxl.stopping ------------------------------------------------------------------------------------------------

def test_a_signal_stops_after_the_step_and_a_second_quits():
    said, before = [], signal.getsignal(signal.SIGINT)
    stop = StopRequest(lambda *a, **k: said.append(a[0]))
    try:
        with pytest.raises(Interrupted):  # before training: nothing to save, stop at once
            os.kill(os.getpid(), signal.SIGTERM)
        stop.training = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and "stopping after this step" in said[-1]
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.signum == signal.SIGINT
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


# --- minsdxl.validation, minsdxl.distributed ----------------------------------------------------------------------------

def test_guidance_conditioning_puts_the_zero_negative_first():
    context, pooled = guidance_conditioning(torch.ones(77, 8), torch.ones(4), "cpu", torch.float32)
    assert context.shape == (2, 77, 8) and pooled.shape == (2, 4)
    assert context[0].abs().sum() == 0 and pooled[0].abs().sum() == 0 and context[1].eq(1).all()


def test_one_process_is_a_world_of_one(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ddp = Distributed()
    assert (ddp.world, ddp.rank, ddp.main) == (1, 0, True)
    model = torch.nn.Linear(2, 2)
    assert ddp.wrap(model, torch.device("cpu")) is model and ddp.any(True) and not ddp.any(False)
    assert ddp.gather(1.5) == [1.5] and ddp.mean(torch.tensor(2.0)) == 2.0
    assert ddp.device("cpu") == torch.device("cpu")
