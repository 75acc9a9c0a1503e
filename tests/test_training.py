"""Saving a stage's final folder: from the full state dict that accelerate gathers (whole under FSDP / ZeRO-3), on the
main process only, atomically, after every process took part in the gathering."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel

from dclip.training import save_final


class FakeAccelerator:
    """Stands in for a sharded run: `get_state_dict` returns the gathered weights, which differ from the weights
    this process's module holds (its shard)."""

    def __init__(self, gathered: dict, is_main_process: bool):
        self.gathered, self.is_main_process = gathered, is_main_process
        self.calls, self.waited = [], False

    def get_state_dict(self, model):
        self.calls.append(model)
        return self.gathered

    def unwrap_model(self, model, keep_torch_compile: bool = True):
        return model

    def wait_for_everyone(self):
        self.waited = True


@pytest.fixture
def student(tiny_clip):
    from modeling_dclip import DCLIPModel

    return DCLIPModel.from_clip(tiny_clip)


def _gathered(model) -> dict:
    return {name: tensor + 1.0 if tensor.is_floating_point() else tensor.clone()
            for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("is_main", [True, False])
def test_final_folder_is_written_from_the_gathered_state_dict(student, processor, tmp_path, is_main):
    gathered = _gathered(student)
    accelerator = FakeAccelerator(gathered, is_main)
    trainer = SimpleNamespace(accelerator=accelerator, model=student, model_wrapped=student)
    folder = save_final(trainer, processor, tmp_path / "final")
    assert accelerator.calls == [student] and accelerator.waited  # every process gathers, then waits
    if not is_main:
        assert not (tmp_path / "final").exists()
        return
    saved = load_file(tmp_path / "final" / "model.safetensors")
    for name, tensor in gathered.items():
        torch.testing.assert_close(saved[name], tensor, msg=name)
    assert json.loads((tmp_path / "final" / "config.json").read_text())["model_type"] == "dclip"
    assert (tmp_path / "final" / "tokenizer.json").is_file() and not (tmp_path / "final.partial").exists()
    assert folder == str(tmp_path / "final")


def test_export_and_a_replacement_model(student, processor, tmp_path):
    """`export` converts the whole copy (the base CLIP is saved as a plain CLIPModel); `model` replaces the
    trainer's (LoRA merged) and is the one gathered."""
    from modeling_dclip import DCLIPModel

    gathered = _gathered(student)
    accelerator = FakeAccelerator(gathered, True)
    other = DCLIPModel(student.config)
    trainer = SimpleNamespace(accelerator=accelerator, model=other, model_wrapped=other)
    save_final(trainer, processor, tmp_path / "clip", model=student, export=DCLIPModel.to_clip)
    assert accelerator.calls == [student]
    reloaded = CLIPModel.from_pretrained(tmp_path / "clip")
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, gathered[name], msg=name)


def test_a_compiled_model_saves_under_its_own_names(student, processor, tmp_path):
    """`--torch_compile`: the trainer holds a compiled wrapper whose weights are named `_orig_mod.<name>`; the folder
    gets the model's own class, config and names."""
    from accelerate import Accelerator

    compiled = torch.compile(student)  # wrapping only: nothing is compiled until it runs
    trainer = SimpleNamespace(accelerator=Accelerator(cpu=True), model=compiled, model_wrapped=compiled)
    save_final(trainer, processor, tmp_path / "final")
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert set(saved) == set(student.state_dict())
    assert json.loads((tmp_path / "final" / "config.json").read_text())["model_type"] == "dclip"
