"""Training checkpoints: exact round trip, atomic writes, keep-last, clear errors."""

import pytest
import torch

from minsdxl.train_state import (CheckpointError, find_latest, list_checkpoints, load_checkpoint,
                                 restore_rng, save_checkpoint)


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt, gen):
    x = torch.randn(8, 4, generator=gen)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_resume_continues_bitwise(tmp_path):
    # Straight: 4 steps. Resumed: 2 steps, checkpoint, fresh objects, load, 2 more steps.
    model, opt = _model_and_opt()
    gen = torch.Generator().manual_seed(1)
    straight = [_step(model, opt, gen) for _ in range(4)]

    model, opt = _model_and_opt()
    gen = torch.Generator().manual_seed(1)
    first = [_step(model, opt, gen) for _ in range(2)]
    save_checkpoint(tmp_path, 2, dict(model.named_parameters()), opt, {"epoch": 0}, noise_generator=gen)

    model, opt = _model_and_opt(seed=123)  # different starting weights: the checkpoint must win
    gen = torch.Generator().manual_seed(999)
    state, adapters, opt_sd, rng = load_checkpoint(find_latest(tmp_path))
    model.load_state_dict(adapters)
    opt.load_state_dict(opt_sd)
    restore_rng(rng, gen)
    assert state["step"] == 2 and state["epoch"] == 0
    second = [_step(model, opt, gen) for _ in range(2)]
    assert first + second == straight


def test_half_written_checkpoint_is_never_latest(tmp_path):
    model, opt = _model_and_opt()
    _step(model, opt, torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path, 5, dict(model.named_parameters()), opt, {})
    # A run killed while writing step 10 leaves a temporary folder, or a folder without its marker.
    (tmp_path / ".checkpoint-10.abcd").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "adapters.safetensors").write_bytes(b"partial")
    assert find_latest(tmp_path).name == "checkpoint-5"


def test_keep_last_and_no_temporary_leftovers(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, dict(model.named_parameters()), opt, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]  # numeric order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3"]


def test_incomplete_checkpoint_error_names_folder(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint-7.*missing"):
        load_checkpoint(tmp_path / "checkpoint-7")
