"""Every `examples/accelerate_configs/*.yaml` goes through `accelerate launch`'s own parsing and validation, and the
environment and torchrun arguments it would hand the processes are checked, without launching them (a dry run: the
configs target GPUs and DeepSpeed, which this machine does not have)."""

from pathlib import Path

import pytest
import torch.distributed.run as distrib_run
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import _filter_args, prepare_deepspeed_cmd_env, prepare_multi_gpu_env


CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs"


def dry_run(name: str):
    """What `accelerate launch --config_file <name> examples/train.py` would set up: the parsed arguments, the
    config, the processes' environment and (DDP, FSDP) the torchrun arguments."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "examples/train.py"])
    args, config, mixed_precision_from_config = _validate_launch_command(args)
    torchrun = None
    if args.use_deepspeed:  # as `accelerate.commands.launch.launch_command` does before `deepspeed_launcher`
        fields = list(config.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
        torchrun = _filter_args(args, distrib_run.get_args_parser(), ["--training_script", args.training_script])
    return args, config, env, torchrun


def test_every_config_is_covered():
    assert {path.name for path in CONFIGS.glob("*.yaml")} == {
        "multi_gpu.yaml", "multi_node.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("name, machines", [("multi_gpu.yaml", 1), ("multi_node.yaml", 2)])
def test_ddp_configs(name, machines):
    args, config, env, torchrun = dry_run(name)
    assert config.distributed_type == "MULTI_GPU" and args.multi_gpu and not args.use_fsdp
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert torchrun.nproc_per_node == str(args.num_processes // machines)
    if machines > 1:  # every machine meets the first one at main_process_ip:main_process_port
        assert torchrun.nnodes == "2" and torchrun.node_rank == 0
        assert "10.0.0.1:29500" in (f"{torchrun.master_addr}:{torchrun.master_port}", torchrun.rdzv_endpoint)


def test_fsdp2_config_wraps_layers_that_exist():
    """FSDP v2, one shard unit per transformer layer of the towers (transformers' `CLIPEncoderLayer`). accelerate
    refuses a class to wrap that the model lacks, and one config serves every stage: so each class named must be in
    the base CLIP, the student and the DCLIP teacher alike (the teacher's fusion layers stay in its root unit)."""
    from transformers import CLIPConfig, CLIPModel

    from modeling_dclip import DCLIPModel, DCLIPTeacherModel

    args, config, env, _ = dry_run("fsdp.yaml")
    assert config.distributed_type == "FSDP" and args.use_fsdp
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    wrapped = set(env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","))
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=64, **tiny), vision_config=dict(image_size=16,
                                                                                            patch_size=8, **tiny),
                                projection_dim=16))
    models = (clip, DCLIPModel.from_clip(clip), DCLIPTeacherModel.from_clip(clip, fusion_hidden_size=16,
                                                                           fusion_num_heads=2))
    assert "CLIPEncoderLayer" in wrapped
    for model in models:
        assert wrapped <= {type(module).__name__ for module in model.modules()}, type(model).__name__


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(stage):
    args, config, env, _ = dry_run(f"deepspeed_zero{stage}.yaml")
    assert config.distributed_type == "DEEPSPEED" and args.use_deepspeed
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    # ZeRO-3 partitions the weights: the final folders need them gathered into one 16-bit state dict
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == ("true" if stage == 3 else "false")
