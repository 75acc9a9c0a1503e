"""Several processes (accelerate, CPU, gloo) give the same loss and the same update as one process over the same
global batch: the contrastive loss gathers features with gradients, and DDP averages the rest."""

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).with_name("distributed_step.py")


def _aborted_after_leaving(stderr: str, processes: int) -> bool:
    """Whether a launch's only fault is gloo's abort at exit: every rank printed that it had left (after
    `leave_together`, the last line of distributed_step.py) before a process aborted."""
    aborted = "terminate called without an active exception" in stderr
    return aborted and all(f"rank {rank}: left" in stderr for rank in range(processes))


def _launch(tmp_path: Path, processes: int, per_device_batch: int, tokenizer_dir: Path, fsdp: bool = False) -> dict:
    output = tmp_path / f"{processes}proc{'-fsdp' if fsdp else ''}" / "result.pt"
    output.parent.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONFAULTHANDLER": "1"}  # an abort prints every thread's Python stack: where each rank was
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu" if processes > 1 else "--cpu",
               "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(29500 + processes + 10 * fsdp), str(SCRIPT), str(output), str(per_device_batch),
               str(tokenizer_dir), *(["fsdp"] if fsdp else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if fsdp and result.returncode != 0 and _aborted_after_leaving(result.stderr, processes) and output.is_file():
        # FSDP2 on gloo, about 1 launch in 80 here: the work is done and saved, and every rank has closed its group
        warnings.warn(f"{processes}-process launch: gloo aborted in the interpreter's shutdown, after every rank "
                      f"had left; its results are complete:\n{result.stderr[-1500:]}", stacklevel=2)
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    import torch.distributed.tensor  # noqa: F401 - FSDP2's saved weights are DTensors: loading them needs the class

    return torch.load(output)


# `python -m accelerate.commands.launch` needs the module, not the `accelerate` executable on PATH
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
def test_two_processes_match_one_process_over_the_same_global_batch(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    one = _launch(tmp_path, 1, per_device_batch=8, tokenizer_dir=tmp_path / "tokenizer")
    two = _launch(tmp_path, 2, per_device_batch=4, tokenizer_dir=tmp_path / "tokenizer")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    # the SGD step moved the weights, so equal weights after it mean equal gradients
    moved = max(float((tensor - one["initial"][name]).abs().max()) for name, tensor in one["weights"].items())
    assert moved > 1e-3
    for name, tensor in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], tensor, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
def test_a_student_saved_under_fsdp2_equals_one_saved_under_ddp(tmp_path, tokenizer):
    """The shipped FSDP config's sharding (accelerate's FSDP2 code, 2 gloo processes; see distributed_step.py) trains
    and saves, through the pipeline's `train_stage` and `save_final`, the same student as DDP: a whole folder in the
    `CLIPModel` layout (CLIP's 0-d `logit_scale`, which FSDP2 cannot shard as such, made 1-d while training)."""
    from safetensors.torch import load_file

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    ddp = _launch(tmp_path, 2, per_device_batch=4, tokenizer_dir=tmp_path / "tokenizer")
    fsdp = _launch(tmp_path, 2, per_device_batch=4, tokenizer_dir=tmp_path / "tokenizer", fsdp=True)
    assert fsdp["sharded"] and not ddp["sharded"]  # the FSDP run's parameters were DTensors while it trained
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-5)
    saved = {mode: load_file(tmp_path / f"2proc{suffix}" / "final" / "model.safetensors")
             for mode, suffix in (("ddp", ""), ("fsdp", "-fsdp"))}
    assert set(saved["fsdp"]) == set(saved["ddp"]) and saved["fsdp"]["logit_scale"].shape == torch.Size([])
    moved = max(float((tensor - ddp["initial"][name]).abs().max()) for name, tensor in saved["ddp"].items()
                if name in ddp["initial"])
    assert moved > 1e-3
    for name, tensor in saved["ddp"].items():
        torch.testing.assert_close(saved["fsdp"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


LEAVE = """
import time

import torch
import torch.distributed as dist

from dclip.cli import leave_together

dist.init_process_group("gloo")  # a group that accelerate does not know of
tensor = torch.ones(4096)
for _ in range(20):
    dist.all_reduce(tensor)
rank = dist.get_rank()
dist.broadcast_object_list([rank])
if rank == 0:
    time.sleep(1.0)  # the other rank must wait for this one
start = time.perf_counter()
leave_together()
if rank == 1:
    print(f"waited {time.perf_counter() - start:.2f} s")
leave_together()  # once the group is closed: nothing
"""


def test_a_launch_that_leaves_together_exits_cleanly(tmp_path):
    """A gloo group left open to the interpreter's shutdown aborted about half of such launches here ("terminate
    called without an active exception", 10 of 20 runs); closed by `leave_together`, none of 20. It waits for the
    slower rank first."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29541", str(script)]
    for _ in range(4):  # with the group left open, at least one of 4 launches aborts with probability about 94%
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-3000:]
        assert float(result.stdout.split("waited ")[1].split(" s")[0]) > 0.8, result.stdout


def test_every_example_that_starts_a_process_group_leaves_together():
    examples = Path(__file__).resolve().parents[1] / "examples"
    starting = [path for path in sorted(examples.glob("*.py"))
                if any(name in path.read_text() for name in ("launch_state", "dclip.pipeline", "PartialState"))]
    assert {path.name for path in starting} >= {"train.py", "compute_targets.py"}
    for path in starting:
        assert "leave_together()" in path.read_text(), path.name


def test_only_an_abort_after_every_rank_left_counts_as_teardown():
    left = "rank 0: left\nrank 1: left\n"
    assert _aborted_after_leaving(left + "terminate called without an active exception\n", 2)
    assert not _aborted_after_leaving("rank 0: left\nterminate called without an active exception\n", 2)
    assert not _aborted_after_leaving(left + "Segmentation fault\n", 2)
