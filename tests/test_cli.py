"""The example CLIs as a user meets them: `--help` shows the defaults a run really uses."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_train_help_shows_the_true_defaults():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # one block per option: from its "  --flag" line to the next option's
    blocks = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n  (?=--)", result.stdout)}
    for flag, default in (("per_device_train_batch_size", "128"), ("logging_steps", "25"), ("save_steps", "100"),
                          ("save_total_limit", "1"), ("output_dir", "outputs/default"), ("distill_steps", "300"),
                          ("distill_learning_rate", "0.001"), ("student_preset", "clip-tiny"),
                          ("pretrain_region_fraction", "0.5")):
        assert f"(default: {default})" in blocks[f"--{flag}"], blocks[f"--{flag}"]


def test_parsed_defaults_are_the_recipe_and_cpu_is_chosen_without_an_accelerator():
    from dclip.arguments import DCLIPTrainingArguments, accelerator_available

    (training_args,) = HfArgumentParser(DCLIPTrainingArguments).parse_args_into_dataclasses([])
    assert (training_args.per_device_train_batch_size, training_args.logging_steps, training_args.save_steps,
            training_args.save_total_limit, training_args.output_dir) == (128, 25, 100, 1, "outputs/default")
    assert training_args.use_cpu == (not accelerator_available())
    (bf16,) = HfArgumentParser(DCLIPTrainingArguments).parse_args_into_dataclasses(["--bf16"])
    assert bf16.bf16  # on a CPU-only machine plain TrainingArguments refuses this ("You need to assign use_cpu")
    (reporting,) = HfArgumentParser(DCLIPTrainingArguments).parse_args_into_dataclasses(["--report_to", "tensorboard"])
    assert reporting.report_to == ["tensorboard"]


def test_stage_arguments_name_each_stage_run():
    from dclip.arguments import DCLIPTrainingArguments
    from dclip.training import stage_arguments

    args = DCLIPTrainingArguments(output_dir="out", run_name="exp")
    stage = stage_arguments(args, "student", 7, 1e-3)
    assert (stage.run_name, stage.output_dir, stage.max_steps, stage.learning_rate) == \
        ("exp-student", str(Path("out") / "student"), 7, 1e-3)
    assert stage_arguments(DCLIPTrainingArguments(output_dir="out"), "teacher", 1, 1.0).run_name == "teacher"


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP")])  # DeepSpeed's needs deepspeed installed
def test_a_sharded_config_on_a_machine_without_gpus_is_named(monkeypatch, caplog, variable, name):
    """`accelerate launch --config_file examples/accelerate_configs/fsdp.yaml` on CPU runs accelerate's MULTI_CPU (plain
    data parallelism, checked by hand with two processes): said once, not silently."""
    import dclip.arguments
    from dclip.arguments import DCLIPTrainingArguments

    monkeypatch.setattr(dclip.arguments, "accelerator_available", lambda: False)
    with caplog.at_level("WARNING", logger="dclip.arguments"):
        DCLIPTrainingArguments(output_dir="unused", report_to=[])
    assert not caplog.records
    monkeypatch.setenv(variable, "true")
    with caplog.at_level("WARNING", logger="dclip.arguments"):
        args = DCLIPTrainingArguments(output_dir="unused", report_to=[])
    assert args.use_cpu and len(caplog.records) == 1
    assert f"asks for {name}, but this process sees no GPU" in caplog.records[0].getMessage()


@pytest.mark.parametrize("script, arguments", [
    ("evaluate.py", ["--model_name_or_path", "missing"]),
    ("curate.py", ["--embeddings", "missing.npy"]),
    ("train_detector.py", []),
])
def test_a_one_process_cli_launched_as_several_stops_before_any_work(tmp_path, script, arguments):
    """`accelerate launch --num_processes 2 examples/evaluate.py` would run the whole evaluation twice, both writing
    the same files: it stops at once (argparse's exit status 2), naming the script and how to run it."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / script), *arguments,
                             "--output_dir" if script != "evaluate.py" else "--output_file", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"examples/{script} runs in one process, but was launched as 2" in result.stderr
    assert f"python examples/{script}" in result.stderr and "usage:" not in result.stderr  # one line, no usage
    assert list(tmp_path.iterdir()) == []  # nothing written
