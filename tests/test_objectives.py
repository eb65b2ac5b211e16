"""The training-only objectives' interface: one file each, found by the registry, named nowhere else, and a
new objective plugged in through the interface alone trains end to end."""

from __future__ import annotations

import ast
import inspect
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import citrus_v
from citrus_v import objectives
from citrus_v.modeling import CitrusV, CitrusVConfig
from citrus_v.objectives import registry
from citrus_v.objectives.base import EncodeContext, Objective, ObjectiveInputs, first_image_targets

PACKAGE = Path(citrus_v.__file__).parent
FOLDER = PACKAGE / "objectives"


def test_every_objective_file_registers_one_objective():
    found = {type(o).__module__.rsplit(".", 1)[-1]: o for o in objectives.registered()}
    support = ("__init__", "annotations", "base", "registry")
    files = {p.stem for p in FOLDER.glob("*.py") if p.stem not in support}
    assert set(found) == files
    names = {o.name for o in found.values()}
    assert names == {"lesion_map", "lesion_count", "text_map", "copy_attention", "point_loss"}
    for stem, objective in found.items():
        assert objective.name == stem  # the file is named for the objective it holds


@pytest.mark.parametrize("objective", objectives.registered(), ids=lambda o: o.name)
def test_an_objective_is_named_only_in_its_own_file_and_the_registry(objective):
    own = FOLDER / f"{objective.name}.py"
    naming = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if objective.name in path.read_text() and path not in (own, FOLDER / "registry.py")
    )
    assert naming == [], f"{objective.name} is named outside its file: {naming}"


def test_the_forward_is_short_and_names_no_objective():
    source = inspect.getsource(CitrusV.forward)
    tree = ast.parse(source.lstrip())
    function = tree.body[0]
    assert function.end_lineno - function.lineno + 1 < 80
    for objective in objectives.registered():
        # (log names are plain words such as "point" or "copy"; names and config keys are the objective's own)
        for word in (objective.name, objective.weight_key):
            assert word not in source, word


class CellBrightness(Objective):
    """A plug-in for the test: one logit per image token says whether its cell lies in a lesion, from
    ``lesion_mask``, trained with an MSE — enough to see the interface carry it from row to loss."""

    name = "cell_brightness"
    log_name = "brightness"
    weight_key = "cell_brightness_loss_weight"
    layout = "image_tokens"
    reads = ("lesion_mask",)
    head_attribute = "cell_brightness_head"
    trains_with = "aligner"
    needs_image_tokens = True

    def build_head(self, config) -> nn.Module:
        return nn.Linear(config.vision_config.out_hidden_size, 1)

    def encode(self, annotations, context: EncodeContext) -> torch.Tensor | None:
        mask = np.asarray(annotations["lesion_mask"], dtype=bool)

        def target(cells, _merge):
            rows, cols = cells
            ys = ((np.arange(rows) + 0.5) * mask.shape[0] / rows).astype(int)
            xs = ((np.arange(cols) + 0.5) * mask.shape[1] / cols).astype(int)
            return torch.from_numpy(mask[ys][:, xs].reshape(-1).astype(np.float32))

        return first_image_targets(context.grid, context.merge, target)

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        known = inputs.targets >= 0
        values = inputs.head(self)(inputs.image_tokens[known]).squeeze(-1)
        return ((values - inputs.targets[known]) ** 2).mean()


@contextmanager
def plugged_in(extra: Objective):
    original = registry.registered
    registry.registered = lambda: (*original(), extra)
    try:
        yield
    finally:
        registry.registered = original


def test_a_new_objective_plugs_in_through_the_interface(tiny):
    tiny_model, processor = tiny
    image = np.zeros((224, 224, 3), np.uint8)
    lesion = np.zeros((224, 224), bool)
    lesion[40:100, 60:120] = True
    image[lesion] = 200
    sample = {
        "messages": [{"role": "user", "content": "<image>Is there a lesion?"}, {"role": "assistant", "content": "yes"}],
        "images": [image],
        "lesion_mask": lesion,
    }
    plug = CellBrightness()
    with plugged_in(plug):
        config = CitrusVConfig.from_dict({**tiny_model.config.to_dict(), plug.weight_key: 0.5})
        torch.manual_seed(0)
        model = CitrusV(config).train()
        batch = processor([sample])
        assert set(batch["objective_targets"]) >= {"cell_brightness", "lesion_map"}
        out = model(**batch)
        assert "cell_brightness_head.weight" in model.state_dict()
        assert "cell_brightness_head." in objectives.head_prefixes("aligner")
        assert "brightness" in objectives.log_names()
    value = out.aux_losses["brightness"]
    assert value.requires_grad and float(value.detach()) > 0
    # the total is the LM loss plus each objective's weighted loss
    weights = {o.log_name: o.weight(config) for o in (*objectives.enabled(config), plug)}
    expected = out.lm_loss + sum(weights[name] * loss for name, loss in out.aux_losses.items())
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    out.loss.backward()
    assert model.cell_brightness_head.weight.grad is not None
    assert float(model.cell_brightness_head.weight.grad.abs().sum()) > 0
    # without it, the same config builds no such head: deleting the file removes the objective
    assert not hasattr(CitrusV(config), "cell_brightness_head")


def test_objective_config_keys_travel_in_config_json_as_before(tiny, tmp_path):
    model, _ = tiny
    model.config.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    for objective in objectives.enabled(model.config):
        assert f'"{objective.weight_key}"' in saved
