"""train.py under torchrun: 2 CPU processes with gloo on the tiny pipeline. The copies stay equal, the
result equals one process with the same global batch, and a 2-process checkpoint resumes in 1 process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(ROOT, "train.py"), "--demo", "--output_dir", str(out),
           "--train_batch_size", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def single(out, *extra):
    """One process, micro-batches of 2 accumulated twice: the same global batch of 4 as 2 x 2."""
    args = train.parse_args(["--demo", "--output_dir", str(out), "--train_batch_size", "2",
                             "--gradient_accumulation_steps", "2", *extra])
    return train.main(args)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    result = torchrun(tmp_path / "ddp", "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert "global batch 4 = 2 per device x 2 processes x 1 accumulation steps" in result.stdout
    ddp = records(tmp_path / "ddp")
    assert len(ddp) == 4
    for r in ddp:  # after every step both processes hold the same adapters
        a, b = r["adapter_checksum_per_rank"]
        assert a == b, r
    single(tmp_path / "one", "--max_train_steps", "4")
    one = records(tmp_path / "one")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ddp]), torch.tensor([r["loss"] for r in one]),
                               rtol=1e-5, atol=1e-6)
    w_ddp, w_one = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert w_ddp.keys() == w_one.keys()
    # Gradients summed in another order differ in the last bits; Adam divides by sqrt(v), which makes that
    # visible in weights whose gradients are near 0. 1e-4 is 2.5% of the 4e-3 four Adam steps at lr 1e-3 move.
    for k in w_ddp:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-3, atol=1e-4)
    assert any(v.abs().sum() > 0 for k, v in w_ddp.items() if "lora_B" in k)

    # 2. The 2-process checkpoint at step 2 resumes in one process and ends where the 2-process run did.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(tmp_path / "ddp" / "checkpoint-2", resumed / "checkpoint-2")
    single(resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    state = json.loads((tmp_path / "ddp" / "checkpoint-2" / "state.json").read_text())
    assert state["world_size"] == 2 and state["batches_done"] == 2  # 2 per process = 4 global batches
    assert [r["step"] for r in records(resumed)] == [3, 4]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records(resumed)]),
                               torch.tensor([r["loss"] for r in ddp[2:]]), rtol=1e-5, atol=1e-6)
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, w_ddp[k], rtol=1e-3, atol=1e-4)


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(ROOT, "train.py"), "--demo", "--output_dir",
           str(tmp_path / "bad"), "--max_train_steps", "2", "--resume_from_checkpoint", str(tmp_path / "nowhere")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "nowhere: no such checkpoint folder" in result.stdout + result.stderr


def test_recipe_flags_under_ddp(tmp_path):
    """Text-encoder LoRA (a second DDP model), EMA, Min-SNR, checkpointing, accumulation, validation."""
    out = tmp_path / "mix"
    torchrun(out, "--max_train_steps", "2", "--train_text_encoder", "--use_ema", "--snr_gamma", "5",
             "--gradient_checkpointing", "--gradient_accumulation_steps", "2", "--validation_prompt", "a circle",
             "--num_validation_images", "1", "--validation_steps", "2", "--validation_inference_steps", "1")
    for r in records(out):
        a, b = r["adapter_checksum_per_rank"]
        assert a == b, r
    assert (out / "validation" / "step-000002.png").is_file()
    assert any(k.startswith("lora_te2_") for k in load_file(str(out / "lora_kohya.safetensors")))


def test_full_finetuning_shards_with_fsdp2_and_equals_one_process(tmp_path):
    """--full_finetune under torchrun: FSDP2 (fully_shard) on gloo/CPU. AdamW in fp32, whose update of a value
    depends on that value alone, so sharded and whole give the same weights; one process accumulates two
    micro-batches of 2 for the same global batch of 4. A sharded checkpoint resumes exactly with 2 processes."""
    # Adam divides by sqrt(v) + eps: with the default eps a gradient near 0 whose sign the summation order flips
    # moves its weight by a whole lr the other way (seen: 1 value in 36,864 off by 1.6e-4). eps 1e-3 keeps the
    # update of such a gradient proportional to it, so the comparison shows the sharding, not that amplification.
    full = ("--full_finetune", "--optimizer", "adamw", "--adam_epsilon", "1e-3", "--max_train_steps", "4")
    result = torchrun(tmp_path / "fsdp", *full, "--checkpointing_steps", "2")
    assert "FSDP2: every UNet weight, its gradient and its optimizer state split across 2 processes" in result.stdout
    single(tmp_path / "one", *full)
    sharded, one = records(tmp_path / "fsdp"), records(tmp_path / "one")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in sharded]), torch.tensor([r["loss"] for r in one]),
                               rtol=1e-5, atol=1e-6)
    read = lambda out: load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    w_fsdp, w_one = read(tmp_path / "fsdp"), read(tmp_path / "one")
    assert w_fsdp.keys() == w_one.keys()
    for k in w_fsdp:
        torch.testing.assert_close(w_fsdp[k], w_one[k], rtol=1e-5, atol=1e-6)
    # The checkpoint holds whole weights and both processes' optimizer shards; resumed by 2 processes it ends
    # where the straight run did, bitwise.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(tmp_path / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(resumed, *full, "--resume_from_checkpoint", "latest")
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in sharded[2:]]
    w_resumed = read(resumed)
    assert all(torch.equal(w_resumed[k], w_fsdp[k]) for k in w_fsdp)
    with pytest.raises(SystemExit, match=r"written by a full fine-tuning run of 2 process\(es\).*resume it with 2"):
        single(tmp_path / "one", *full, "--resume_from_checkpoint", str(tmp_path / "fsdp" / "checkpoint-2"))


def test_dreambooth_class_images_are_shared_out_and_training_equals_one_process(tmp_path, monkeypatch):
    """--with_prior_preservation under torchrun: each process generates its share of the missing class images
    (every index once), and training on them equals one process with the same global batch."""
    dreambooth = ("--instance_prompt", "a photo of sks shape", "--with_prior_preservation", "--class_prompt", "a shape",
                  "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "5", "--sample_batch_size", "2",
                  "--class_inference_steps", "2", "--max_train_steps", "2")
    result = torchrun(tmp_path / "ddp", *dreambooth)
    assert "class images: generated 5 in" in result.stdout and "(3 by this process)" in result.stdout  # rank 0: 0, 2, 4
    assert sorted(int(p.name.split("-")[0]) for p in (tmp_path / "class").glob("*.png")) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(train, "generate_class_images", lambda *a, **k: pytest.fail("class images generated again"))
    single(tmp_path / "one", *dreambooth)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records(tmp_path / "ddp")]),
                               torch.tensor([r["loss"] for r in records(tmp_path / "one")]), rtol=1e-5, atol=1e-6)
