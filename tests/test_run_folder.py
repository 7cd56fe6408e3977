"""train.py never destroys a run and fails early and clearly: re-running into a folder, stopping,
durable checkpoints, resuming with changed flags or from a damaged checkpoint, signals, and every
flag doing something. Tiny demo runs of 1-3 steps on the CPU."""

import json
import os
import re
import signal
import stat
from pathlib import Path

import pytest
from safetensors import safe_open

import train
from minsdxl import train_args, train_state, validation
from minsdxl.train_state import save_checkpoint

STEPS = ("--max_train_steps",)


def run(out: Path, *extra) -> dict:
    return train.main(train.parse_args(["--demo", "--output_dir", str(out), *extra]))


def cli(out: Path, *extra) -> int:
    return train.cli(["--demo", "--output_dir", str(out), *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def no_model_loading(monkeypatch):
    """Make loading any model a test failure: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags and the output folder were checked")
    for name in ("load_unet", "load_text_encoders", "load_vae"):
        monkeypatch.setattr(train, name, refuse)


def lora_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    run(out, "--max_train_steps", "2", "--checkpointing_steps", "1")
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


# --- 1. a previous run is never overwritten silently ---------------------------------------------

def test_a_fresh_run_into_a_previous_run_refuses_before_loading(finished, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match=r"holds a previous run \(2 checkpoint\(s\), the newest checkpoint-2; "
                                         r"metrics.jsonl \(2 steps\).*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        run(out, "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched


def test_overwrite_output_dir_starts_again_and_prunes_by_step(finished, tmp_path):
    out = copy_run(finished, tmp_path / "out")
    save_checkpoint(out, 30, {}, train_state_optimizer(), {})  # an older run that went further
    run(out, "--overwrite_output_dir", "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in train_state.list_checkpoints(out)) == ["checkpoint-2", "checkpoint-3"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def train_state_optimizer():
    import torch
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def test_pruning_always_keeps_the_checkpoint_just_written(tmp_path):
    opt = train_state_optimizer()
    save_checkpoint(tmp_path, 30, {}, opt, {})
    save_checkpoint(tmp_path, 20, {}, opt, {})
    save_checkpoint(tmp_path, 1, {}, opt, {}, keep_last=2)
    assert [p.name for p in train_state.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-30"]


# --- 2. a stopped run leaves a usable LoRA; 13. signals -------------------------------------------

def signal_at(monkeypatch, step: int, *signums: int):
    """Send `signums` to this process while optimizer step `step` + 1 runs."""
    real = train.lr_factor

    def lr_factor(s, args, total):
        if s == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(s, args, total)
    monkeypatch.setattr(train, "lr_factor", lr_factor)
    return real


def test_sigterm_saves_a_checkpoint_and_a_partial_lora_and_exits_143(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sig"
    real = signal_at(monkeypatch, 2, signal.SIGTERM)
    assert cli(out, "--max_train_steps", "5", "--checkpointing_steps", "100") == 128 + signal.SIGTERM
    assert (out / "checkpoint-3" / "state.json").is_file()
    said = capsys.readouterr().out
    assert "SIGTERM: stopping after this step" in said and "marked partial" in said
    meta = lora_metadata(out / "pytorch_lora_weights.safetensors")
    assert meta["minsdxl.partial"] == "true" and meta["minsdxl.steps"] == "3"
    assert lora_metadata(out / "lora_kohya.safetensors")["minsdxl.partial"] == "true"
    monkeypatch.setattr(train, "lr_factor", real)
    assert cli(out, "--max_train_steps", "5", "--resume_from_checkpoint", "latest") == 0
    meta = lora_metadata(out / "pytorch_lora_weights.safetensors")
    assert meta["minsdxl.partial"] == "false" and meta["minsdxl.steps"] == "5"


def test_ctrl_c_twice_quits_at_once_with_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "twice"
    signal_at(monkeypatch, 1, signal.SIGINT, signal.SIGINT)
    assert cli(out, "--max_train_steps", "5", "--checkpointing_steps", "100") == 130
    captured = capsys.readouterr()
    assert "press Ctrl-C again to quit now" in captured.out and "stopped by SIGINT" in captured.err
    assert not train_state.list_checkpoints(out)  # quit at once: nothing saved after the second Ctrl-C
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_ctrl_c_while_loading_is_a_clean_exit(tmp_path, monkeypatch, capsys):
    def interrupted_load(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal should have stopped the load")
    monkeypatch.setattr(train, "load_unet", interrupted_load)
    assert cli(tmp_path / "load", "--max_train_steps", "2") == 130
    assert "train.py: stopped by SIGINT" in capsys.readouterr().err


# --- 3. durable checkpoints; 4. permissions ------------------------------------------------------

def test_checkpoint_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    save_checkpoint(tmp_path, 4, {}, train_state_optimizer(), {})
    renamed = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(renamed) == 1
    tmp = events[renamed[0]][1]
    synced_before = {Path(p).name for kind, p in events[:renamed[0]] if kind == "fsync"}
    assert synced_before == {"adapters.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", Path(tmp).name}
    assert events[renamed[0] + 1] == ("fsync", str(tmp_path))  # the rename itself reaches the disk


def test_outputs_get_the_usual_umask_permissions(finished):
    umask = os.umask(0)
    os.umask(umask)
    checkpoint = finished / "checkpoint-2"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o777 & ~umask
    for f in [*checkpoint.iterdir(), finished / "pytorch_lora_weights.safetensors", finished / "metrics.jsonl"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_leftovers_of_a_killed_checkpoint_write_are_removed_and_reported(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "out")
    (out / ".checkpoint-3.tmp-999").mkdir()
    (out / ".checkpoint-3.tmp-999" / "adapters.safetensors").write_bytes(b"half")
    run(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert not (out / ".checkpoint-3.tmp-999").exists()
    assert "removed .checkpoint-3.tmp-999: an unfinished checkpoint write" in capsys.readouterr().out


# --- 8. failing early, failing clearly -------------------------------------------------------------

def test_bad_output_dir_is_refused_by_name(tmp_path, monkeypatch):
    no_model_loading(monkeypatch)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"--output_dir .*file is a file, not a folder"):
        run(tmp_path / "file")
    with pytest.raises(SystemExit, match=r"--output_dir .*file/sub cannot be written to"):
        run(tmp_path / "file" / "sub")


def test_8bit_adam_on_the_cpu_is_refused_before_loading(tmp_path, monkeypatch):
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match="--use_8bit_adam .*CUDA GPUs only, not on cpu"):
        run(tmp_path / "a", "--use_8bit_adam")


def test_a_missing_checkpoint_is_named_before_loading(tmp_path, monkeypatch):
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match=r"nope: no such checkpoint folder"):
        run(tmp_path / "a", "--resume_from_checkpoint", str(tmp_path / "nope"))


# --- 9. resuming with changed flags ---------------------------------------------------------------

def test_resume_applies_a_new_learning_rate_and_says_so(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "out")
    run(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--learning_rate", "5e-4")
    assert "resume: --learning_rate changed from 0.001 to 0.0005; applied from step 2 on" in capsys.readouterr().out
    assert [r["lr"] for r in metrics(out)] == [1e-3, 1e-3, 5e-4]


@pytest.mark.parametrize("flag, value", [("--seed", "7"), ("--rank", "4"), ("--resolution", "128"),
                                         ("--lora_targets", "attn")])
def test_resume_refuses_flags_that_shape_the_run(finished, tmp_path, monkeypatch, flag, value):
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match=rf"other {flag} .*\(now .*{value}.*\).*cannot change on resume"):
        run(finished, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", flag, value)


def test_adapters_that_do_not_fit_are_named(finished, tmp_path):
    out = copy_run(finished, tmp_path / "out")
    state_file = out / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    del state["args"]  # an older checkpoint: no flags to compare, so the tensors themselves are checked
    state_file.write_text(json.dumps(state))
    with pytest.raises(SystemExit, match=r"do not fit this run's LoRA layers .*shapes differ.*--rank"):
        run(out, "--max_train_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"), "--rank", "4")


# --- 10. damaged checkpoints and metrics -----------------------------------------------------------

def test_a_damaged_newest_checkpoint_falls_back_to_the_last_intact_one(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "out")
    adapters = out / "checkpoint-2" / "adapters.safetensors"
    adapters.write_bytes(adapters.read_bytes()[:100])  # truncated
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a line cut by a kill
    with pytest.raises(SystemExit, match=r"checkpoint-2/adapters.safetensors is damaged"):
        run(out, "--max_train_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    run(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    said = capsys.readouterr().out
    assert "checkpoint-2/adapters.safetensors is damaged" in said and "resuming from checkpoint-1, the newest intact" in said
    assert "metrics.jsonl, line 3: not a complete record" in said
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


# --- 11. every flag does something -----------------------------------------------------------------

# Flags accepted for compatibility with diffusers' scripts that need no code of ours; each says why.
ACCEPTED_WITHOUT_EFFECT = {
    "local_rank": "torch.distributed.launch passes it; torchrun's environment variables are read instead",
    "dataloader_num_workers": "data is prepared in the main process (its help says so)",
    "hub_token": "only with --push_to_hub, which is refused",
    "hub_model_id": "only with --push_to_hub, which is refused",
    "output_kohya_format": "diffusers' DreamBooth script writes kohya's format only when asked; we always write it",
}


def test_every_flag_is_read():
    """A flag is read as `args.<name>` in train.py or a minsdxl module (the ones train.py hands its flags to),
    refused by name (NOT_SUPPORTED_YET), or listed above."""
    root = Path(train.__file__).parent
    source = "\n".join(f.read_text() for f in [root / "train.py", *sorted((root / "minsdxl").glob("*.py"))])
    unread = [a.dest for a in train_args.build_parser()._actions
              if a.dest != "help" and not re.search(rf"\b(args|pre)\.{a.dest}\b", source)
              and a.dest not in train_args.NOT_SUPPORTED_YET and a.dest not in ACCEPTED_WITHOUT_EFFECT]
    assert unread == [], f"flags that nothing reads: {unread}"


def test_lora_targets_that_match_nothing_are_refused_before_loading(tmp_path, monkeypatch):
    real_load_unet = train.load_unet
    loaded = []
    monkeypatch.setattr(train, "load_unet", lambda *a, **k: loaded.append(k.get("device")) or real_load_unet(*a, **k))
    with pytest.raises(SystemExit, match=r"--lora_targets 'to_qq,no_such_layer': LoRA targets .* matched no"):
        run(tmp_path / "a", "--lora_targets", "to_qq,no_such_layer")
    assert loaded == ["meta"]  # only the shapes-only probe, no weights


def test_help_shows_each_default_once():
    parser = train.build_parser()
    formatter = parser._get_formatter()
    helps = {a.dest: formatter._get_help_string(a) or "" for a in parser._actions}
    assert [d for d, h in helps.items() if h.count("(default:") > 1] == []
    assert helps["rank"] == "LoRA rank (default: %(default)s)"


def test_a_stop_during_validation_is_not_kept_waiting(tmp_path, monkeypatch):
    real_generate, calls = validation.generate, []

    def generate(*a, **k):  # the first validation image: the signal arrives while it is made
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(*a, **k)
    monkeypatch.setattr(validation, "generate", generate)
    out = tmp_path / "val"
    code = cli(out, "--max_train_steps", "4", "--validation_prompt", "a red circle", "--validation_steps", "1",
               "--num_validation_images", "4", "--validation_inference_steps", "2")
    assert code == 128 + signal.SIGTERM
    assert len(calls) == 1  # the other 3 base images, and the 4 LoRA images, were not made
    assert train_state.list_checkpoints(out)[-1].name == "checkpoint-1"


def test_resume_refuses_another_global_batch(finished, monkeypatch):
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match=r"global batch of 4 images per step .* this one has 8"):
        run(finished, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--gradient_accumulation_steps", "2")
