"""One `DCLIPTrainer` step on a fixed batch of 8, run by `tests/test_distributed.py` under `accelerate launch` with
1 or 2 processes (args: output file, per-device batch, tokenizer folder, and optionally `fsdp`). Rank 0 saves the
logged loss and the updated weights to `argv[1]`; every mode also saves the student through the pipeline's own
`save_final` into `final/` beside it.

`fsdp`: the model is sharded by accelerate's FSDP2 code (`fully_shard` per the shipped
`examples/accelerate_configs/fsdp.yaml`), trained by the pipeline's `train_stage` and saved whole by `save_final`.
accelerate turns FSDP on only where there are GPUs (on CPU it runs the config as plain data parallelism), so here
its state is set to FSDP by hand; everything after that is accelerate's and the pipeline's own code, on gloo."""

import os
import sys

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, TrainingArguments


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import CORPUS, IMAGE_SIZE, tiny_clip_config_kwargs  # noqa: E402

from dclip.cli import leave_together  # noqa: E402
from dclip.data.collator import DCLIPCollator  # noqa: E402
from dclip.trainer import DCLIPTrainer  # noqa: E402
from dclip.training import save_final, train_stage  # noqa: E402
from modeling_dclip import DCLIPModel  # noqa: E402
from processing_dclip import DCLIPProcessor  # noqa: E402


def force_fsdp2(trainer) -> None:
    """Set accelerate's state to FSDP2 with the shipped config's settings (see the module docstring)."""
    import yaml
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    config = yaml.safe_load(open(os.path.join(REPO_ROOT, "examples", "accelerate_configs", "fsdp.yaml")))["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=config["fsdp_version"], auto_wrap_policy=config["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=config["fsdp_transformer_layer_cls_to_wrap"].split(","),
        state_dict_type=config["fsdp_state_dict_type"], reshard_after_forward=config["fsdp_reshard_after_forward"])
    state = trainer.accelerator.state
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    trainer.is_fsdp_enabled = True


def main(output: str, per_device_batch: int, tokenizer_dir: str, fsdp: bool = False) -> None:
    # one tokenizer for every process, saved by the test: as a run's processor is
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = DCLIPProcessor(image_processor, tokenizer)
    torch.manual_seed(0)
    student = DCLIPModel.from_clip(CLIPModel(CLIPConfig(**tiny_clip_config_kwargs(tokenizer))))
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(2, 8, 16)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=-1, keepdims=True)
    data = Dataset.from_dict({
        "image": [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(8)],
        "caption": [CORPUS[i % len(CORPUS)] + f" number {i}" for i in range(8)],
        "teacher_image_embeds": list(targets[0]), "teacher_text_embeds": list(targets[1]),
    })
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(output), "trainer"), per_device_train_batch_size=per_device_batch,
        max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = DCLIPTrainer(model=student, args=args, train_dataset=data, data_collator=DCLIPCollator(processor),
                           loss_weights={"contrastive": 1.0, "cosine_image": 0.5, "cosine_text": 0.5})
    if fsdp:
        force_fsdp2(trainer)
    initial = {name: tensor.detach().clone() for name, tensor in student.state_dict().items()}
    train_stage(trainer, None)
    sharded = any(type(parameter).__name__ == "DTensor" for parameter in trainer.model.parameters())
    if fsdp:
        force_fsdp2(trainer)  # the Trainer resets accelerate's state when training ends
    save_final(trainer, processor, os.path.join(os.path.dirname(output), "final"))
    if trainer.accelerator.is_main_process:
        logged = [entry for entry in trainer.state.log_history if "loss" in entry][0]
        weights = {
            name: tensor.detach().clone()
            for name, tensor in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
        }
        torch.save({"loss": logged["loss"], "world_size": trainer.accelerator.num_processes, "weights": weights,
                    "initial": initial, "sharded": sharded}, output)
    leave_together()  # as the example CLIs end: every rank waits for the others, then the group is closed
    print(f"rank {trainer.accelerator.process_index}: left", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], fsdp=sys.argv[4:] == ["fsdp"])
