"""The whole recipe through `examples/train.py` in 2 CPU processes (accelerate, gloo): every stage runs once as one
distributed job (not as two copies of the job on the same files), and `--stage distill` alone with a new
`--student_model` saves the same student as 1 process over the same global batch, and as 1 process reading the teacher
targets that `examples/compute_targets.py` wrote in 2 processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_train_scenes", "128", "--image_size", "32", "--preset", "clip-tiny", "--fusion_hidden_size", "32",
        "--seed", "0", "--save_steps", "2", "--logging_steps", "1", "--compare_methods", "none,clip_cid"]


def _train(processes: int, port: int, *arguments: str, script: str = "train.py",
           common: tuple[str, ...] = tuple(TINY)) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launch = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--cpu", "--num_processes", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(REPO_ROOT / "examples" / script), *common, *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_pipeline_in_two_processes_then_distill_alone_matches_one_process(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "two"
    result = _train(2, 29631, "--output_dir", str(run), "--cache_dir", str(cache), "--detector_epochs", "1",
                    "--detector_train_samples", "32", "--pretrain_steps", "3", "--teacher_steps", "3",
                    "--distill_steps", "3", "--per_device_train_batch_size", "8", "--max_eval_samples", "32")
    assert result.stdout.count("\ntotal: ") == 1  # one job: the main process reports once
    assert result.stderr.count("INFO dclip.stages: detector: mAP50") == 1  # logged at INFO, by the main process
    for name in ("base_clip", "teacher", "student"):
        assert (run / name / "final" / "model.safetensors").is_file(), name
        assert not (run / name / "final.partial").exists()
    assert "batch 8 per device x 2 processes" in (run / "student" / "final" / "README.md").read_text()

    # the teacher's targets as a sharded job in 2 processes (examples/compute_targets.py), which a student reads
    targets = tmp_path / "targets"
    result = _train(2, 29634, "--teacher_model", str(run / "teacher" / "final"), "--targets_dir", str(targets),
                    "--shard_size", "25", "--num_train_scenes", "128", "--image_size", "32", "--cache_dir",
                    str(cache), "--data_seed", "0", script="compute_targets.py", common=())
    assert "process 0: 3 shard(s) computed (75 rows" in result.stdout  # shards 0, 2, 4 of 25 rows
    assert "process 1: 3 shard(s) computed (53 rows" in result.stdout  # 1, 3 and the last 3 rows
    assert result.stdout.count("manifest: ") == 1
    students = {}
    for name, processes, batch, port, extra in (("2", 2, 8, 29632, ()), ("1", 1, 16, 29633, ()),
                                                ("targets", 1, 16, 29635, ("--teacher_targets", str(targets)))):
        folder = tmp_path / f"distill{name}"
        shutil.copytree(run / "teacher", folder / "teacher")
        _train(processes, port, "--stage", "distill", "--student_model", str(run / "base_clip" / "final"),
               "--output_dir", str(folder), "--cache_dir", str(cache), "--distill_steps", "3",
               "--distill_learning_rate", "1e-2", "--per_device_train_batch_size", str(batch), *extra)
        students[processes if not extra else name] = load_file(folder / "student" / "final" / "model.safetensors")
    # the 2-process run computed its students' targets in both processes, as shards (the 1-process one did not)
    assert list((tmp_path / "distill2" / "teacher_targets").glob("*/manifest.json"))
    assert not (tmp_path / "distill1" / "teacher_targets").exists()
    base = load_file(run / "base_clip" / "final" / "model.safetensors")
    assert set(students[1]) == set(students[2]) == set(base)
    moved = max(float((students[1][name] - tensor).abs().max()) for name, tensor in base.items())
    assert moved > 1e-2  # so agreeing to 1e-5 below means the same gradients, not two untrained copies
    for name, tensor in students[1].items():
        if name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores a constant per query), so
            continue  # AdamW turns float noise of either run into full-size steps
        torch.testing.assert_close(students[2][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
        # the student of the sharded targets is the student of its own cached targets
        torch.testing.assert_close(students["targets"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
