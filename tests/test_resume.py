"""A run killed with SIGKILL mid-stage and started again with --resume_from_checkpoint continues from its last
complete checkpoint, skips the stages it had finished, and finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dclip.training import last_complete_checkpoint


REPO_ROOT = Path(__file__).resolve().parents[1]


def _complete_checkpoints(folder: Path) -> list[int]:
    steps = []
    for path in folder.glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        steps.append(int(path.name.split("-")[1]))
    return sorted(steps)


def test_sigkill_then_resume_continues_from_the_last_checkpoint(tmp_path):
    output = tmp_path / "run"
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--output_dir", str(output),
        "--cache_dir", str(tmp_path / "cache"), "--preset", "clip-tiny", "--num_train_scenes", "256",
        "--image_size", "32", "--max_eval_samples", "32", "--detector_epochs", "0", "--fusion_hidden_size", "32",
        "--compare_methods", "", "--pretrain_steps", "2", "--teacher_steps", "2", "--distill_steps", "150",
        "--save_steps", "5",
        "--per_device_train_batch_size", "8", "--logging_steps", "5", "--use_cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not _complete_checkpoints(output / "student"):
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no student checkpoint in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    last_before = _complete_checkpoints(output / "student")[-1]
    assert last_before < 150 and not (output / "student" / "final").exists()
    base_mtime = (output / "base_clip" / "final" / "model.safetensors").stat().st_mtime

    result = subprocess.run(command + ["--resume_from_checkpoint", "true"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    distill = summary["training"]["distill"]
    assert distill["resumed_from"] is not None
    assert int(distill["resumed_from"].rsplit("-", 1)[1]) >= last_before
    assert distill["global_step"] == 150
    assert set(summary["training"]) == {"distill"}  # base CLIP and teacher were finished: not trained again
    assert (output / "base_clip" / "final" / "model.safetensors").stat().st_mtime == base_mtime
    assert (output / "student" / "final" / "model.safetensors").is_file()
    assert {"base_clip", "teacher", "student"} <= set(summary["metrics"])


def test_incomplete_checkpoint_is_skipped(tmp_path):
    for step, state in ((5, "{}"), (10, '{"global_st'), (15, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert last_complete_checkpoint(tmp_path / "missing") is None
