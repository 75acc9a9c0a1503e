"""What every training stage shares: its `TrainingArguments`, training with resumption from a checkpoint, saving the
final folder whole from any parallel setup (DDP, FSDP, DeepSpeed ZeRO-3), and the process plumbing around them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from .folders import write_whole


logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingLog:
    """How a stage trained: the checkpoint it resumed from (if any), the steps reached, its rows and seconds."""

    resumed_from: str | None
    global_step: int
    train_rows: int | None  # None: a streamed training split
    seconds: float


def wait_for_everyone() -> None:
    """A barrier across the processes of a distributed run; nothing in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def cpu_threads_per_process(requested: int | None = None) -> int:
    """`requested`, else this process's usable cores shared among the processes on this machine. `accelerate launch`
    exports OMP_NUM_THREADS=1 unless given `--cpu`, which would leave a CPU run on one core."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--cpu_threads must be at least 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def stage_arguments(training_args: TrainingArguments, name: str, steps: int, learning_rate: float,
                    warmup: float | None = None) -> TrainingArguments:
    """The run's training arguments for one stage: its own folder, steps, learning rate, warm-up (`warmup`: steps,
    or a fraction of them below 1; default the run's) and run name (one per stage for `--report_to`
    integrations); the run pushes only the student, at the end."""
    run_name = f"{training_args.run_name}-{name}" if training_args.run_name else name
    return dataclasses.replace(
        training_args, output_dir=os.path.join(training_args.output_dir, name), max_steps=steps,
        learning_rate=learning_rate, remove_unused_columns=False, push_to_hub=False, run_name=run_name,
        warmup_steps=training_args.warmup_steps if warmup is None else warmup,
    )


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest `checkpoint-<step>` in `folder` that was completely written. The Trainer writes
    `trainer_state.json` last, so a run killed while saving leaves a checkpoint without a readable one: skipped."""
    folder = Path(folder)
    steps = sorted((int(path.name.split("-")[1]), path) for path in folder.glob("checkpoint-*")
                   if path.is_dir() and path.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s", path)
            continue
        return str(path)
    return None


def explicit_checkpoint(resume_from: str | bool | None) -> Path | None:
    """The checkpoint folder that `--resume_from_checkpoint` names, or None for `true` / unset (checked complete)."""
    if not resume_from or not isinstance(resume_from, str) or resume_from.lower() in ("true", "1", "yes"):
        return None
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"--resume_from_checkpoint {resume_from}: not a complete Trainer checkpoint (no "
                         "trainer_state.json): pass a `checkpoint-<step>` folder, or `true` for each stage's last one")
    return path


def uses_fsdp2(trainer: Trainer) -> bool:
    """Whether `trainer` shards its model with FSDP2 (`fully_shard`, e.g. `examples/accelerate_configs/fsdp.yaml`)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def vectorize_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Give every 0-d parameter (CLIP's `logit_scale`) shape `(1,)`, which FSDP2's `fully_shard` needs; the values and
    the losses stay the same (they read a scale of one element either way), and `save_final` writes them back as
    0-d, so saved folders keep the `CLIPModel` layout. Returns the names changed."""
    changed = []
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dim() == 0:
                setattr(module, name, torch.nn.Parameter(parameter.detach().reshape(1),
                                                         requires_grad=parameter.requires_grad))
                changed.append(f"{module_name}.{name}".lstrip("."))
    return changed


def train_stage(trainer: Trainer, resume_from: str | bool | None, explicit: Path | None = None) -> TrainingLog:
    """`trainer.train()`; when resuming (`resume_from`), from `explicit` if given, else from the last complete
    checkpoint in the stage's folder. Under FSDP2 the model's 0-d parameters first become 1-d
    (`vectorize_scalar_parameters`)."""
    if uses_fsdp2(trainer):
        vectorize_scalar_parameters(trainer.model)
    checkpoint = None
    if resume_from:
        checkpoint = str(explicit) if explicit is not None else last_complete_checkpoint(trainer.args.output_dir)
    if checkpoint:
        logger.info("resuming %s from %s", trainer.args.output_dir, checkpoint)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    rows = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else None  # None: a stream
    return TrainingLog(resumed_from=checkpoint, global_step=trainer.state.global_step, train_rows=rows,
                       seconds=round(time.perf_counter() - started, 1))


class NonFiniteLossError(FloatingPointError):
    """A training step's loss was NaN or infinite."""


def guard_finite_loss(trainer: Trainer, stage: str, skip: bool = False) -> None:
    """
    After each training step of `trainer`, check its loss (one host sync per step; one all-reduce of a flag across
    processes): a NaN or infinite loss stops the stage with a `NonFiniteLossError` naming the stage, the step and
    the loss terms that are not finite (`trainer.last_terms` where the trainer keeps them), before the optimizer
    step, so no later checkpoint is written and the last one stays intact. With `skip`, the step's gradients are
    dropped instead (no parameter moves; the learning-rate schedule goes on), counted in `trainer.skipped_steps`.
    """
    step_once = trainer.training_step
    trainer.skipped_steps = 0

    def training_step(model, inputs, num_items_in_batch=None):
        loss = step_once(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if trainer.accelerator.num_processes > 1:  # every process stops or skips together
            finite = trainer.accelerator.reduce(finite, reduction="mean")
        if bool(finite.item() == 1.0):
            return loss
        terms = getattr(trainer, "last_terms", None) or {"loss": loss}
        bad = {name: float(value.detach().float().mean()) for name, value in terms.items()
               if not torch.isfinite(value.detach()).all()}
        where = f"stage {stage}, step {trainer.state.global_step + 1}"
        if not skip:
            raise NonFiniteLossError(
                f"{where}: the loss is not finite (terms {bad or 'on another process'}); stopped before the "
                f"optimizer step, so the last checkpoint in {trainer.args.output_dir} is intact. Lower the learning "
                "rate, check the data for NaN, or pass --skip_nonfinite_loss to skip such steps")
        logger.warning("%s: the loss is not finite (terms %s): step skipped, no parameter moved", where, bad)
        model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        trainer.skipped_steps += 1
        return torch.zeros_like(loss.detach())

    trainer.training_step = training_step


def save_final(trainer: Trainer, processor, folder: str | Path, model: torch.nn.Module | None = None,
               export: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> str:
    """
    Save the trained model of `trainer` with `processor` as a Hub-ready folder, atomically: written as
    `<folder>.partial`, then swapped in by renames, so that an error or a kill while writing leaves the previous
    complete folder (if any) in place. Every process must call it: the full state dict is gathered through accelerate
    (`Accelerator.get_state_dict`: whole under DDP, FSDP and DeepSpeed ZeRO-3), and the main process loads it into an
    unsharded copy of the model, passes that through `export` (e.g. `DCLIPModel.to_clip`) and writes it. `model`
    replaces the trainer's (e.g. LoRA adapters merged into it). Every process returns once the folder is written.
    """
    accelerator, folder = trainer.accelerator, Path(folder)
    source = model if model is not None else trainer.model_wrapped
    state_dict = accelerator.get_state_dict(source)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(source, keep_torch_compile=False)
        # a compiled model (`--torch_compile`) names its weights `_orig_mod.<name>`
        state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in state_dict.items()}
        whole = type(model)(model.config)
        shapes = {name: tensor.shape for name, tensor in whole.state_dict().items()}
        # parameters made 1-d for FSDP2 (`vectorize_scalar_parameters`) go back to the model's own 0-d shape
        state_dict = {name: tensor.reshape(shapes[name]) if name in shapes and tensor.dim() == 1
                      and shapes[name] == torch.Size([]) else tensor for name, tensor in state_dict.items()}
        whole.load_state_dict(state_dict, strict=True)
        whole = (export(whole) if export is not None else whole).to(dtype=model.dtype)
        write_whole(folder, lambda partial: (whole.save_pretrained(partial), processor.save_pretrained(partial)))
    accelerator.wait_for_everyone()
    return str(folder)
