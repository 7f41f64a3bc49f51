"""The command line, the server's schemas, the Slicer panel (parameters and .ui widgets) and the client take their
defaults, choices and bounds from the library's options (MedDiffusionLib/options.py): checked here, field by field.
What the server refuses is checked against the library in test_server.py (the same message for the same value)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from MedDiffusionLib.options import (DEFAULT_METHOD, DEFAULT_SAMPLER, MASKS, METHOD_TASKS, METHODS, SAMPLERS,
                                     SCHEDULE_LENGTH, TASKS, GenerateOptions, ReconstructOptions, default_steps)

REPO = Path(__file__).resolve().parents[1]


def _subparser(name: str) -> argparse.ArgumentParser:
    from MedDiffusionLib.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command, options", [("generate", GenerateOptions), ("reconstruct", ReconstructOptions),
                                              ("evaluate", ReconstructOptions)])
def test_cli_arguments_come_from_the_options(command, options) -> None:
    actions = {a.dest: a for a in _subparser(command)._actions}
    specs = options.specs()
    shared = [name for name in specs if name in actions]
    assert {"sampler", "steps"} <= set(shared)
    for name in shared:
        action, spec = actions[name], specs[name]
        if (command, name) in (("evaluate", "seed"), ("generate", "anatomy"), ("generate", "size_xyz")):
            continue  # evaluate: the first seed of a series (default 0); generate: one or several anatomies
        if spec.kind is not bool:
            assert action.default == spec.default, name
        if spec.choices:
            assert action.metavar == "{" + ",".join(spec.choices) + "}", name
        assert spec.help in (action.help or ""), name


def test_server_schemas_come_from_the_options() -> None:
    from MedDiffusionLib.server.schemas import GenerateRequest, Limits, ReconstructParams

    for model, options in ((GenerateRequest, GenerateOptions), (ReconstructParams, ReconstructOptions)):
        specs = options.specs()
        schema = model.model_json_schema()["properties"]
        for name, f in model.model_fields.items():
            spec = specs[name]  # every request field is an option of the task
            if name != "anatomy" or options is ReconstructOptions:
                assert f.default == spec.default, name
            prop = schema[name]
            if spec.choices:
                assert prop["enum"] == list(spec.choices), name
            if spec.bound is not None and spec.bound.high is not None:
                assert prop["maximum"] == spec.bound.high, name
    assert Limits.model_fields["max_steps"].default == SCHEDULE_LENGTH
    assert ReconstructParams.model_json_schema()["properties"]["acceleration"]["exclusiveMinimum"] == 1


def test_client_defaults_are_the_options() -> None:
    from MedDiffusionLib.client import RemoteClient, reconstruct_fields

    specs = {**GenerateOptions.specs(), **ReconstructOptions.specs()}
    for fn in (RemoteClient.generate, RemoteClient.reconstruct, reconstruct_fields):
        params = inspect.signature(fn).parameters
        for name, p in params.items():
            if name in specs and p.default is not inspect.Parameter.empty:
                options = GenerateOptions if fn is RemoteClient.generate else ReconstructOptions
                assert p.default == options.spec(name).default, (fn.__name__, name)


@pytest.fixture(scope="module")
def panel():
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    for path in (REPO, REPO / "MedDiffusion"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from MedDiffusionLogic import parameters

    return parameters


def test_slicer_parameters_come_from_the_options(panel) -> None:
    fields = {f.name: f for f in dataclasses.fields(panel.MedDiffusionParameters)}
    defaults = panel.MedDiffusionParameters()
    assert fields["sampler"].metadata["choices"] == SAMPLERS and defaults.sampler == DEFAULT_SAMPLER
    assert defaults.steps == default_steps(DEFAULT_SAMPLER)
    assert (fields["steps"].metadata["min"], fields["steps"].metadata["max"]) == (1, SCHEDULE_LENGTH)
    assert fields["task"].metadata["choices"] == tuple(TASKS) and panel.TASK_MODALITY == TASKS
    assert fields["mask"].metadata["choices"] == MASKS
    assert fields["method"].metadata["choices"] == METHODS and defaults.method == DEFAULT_METHOD == ReconstructOptions.method
    for task in TASKS:  # the panel lists the methods the library accepts for the task, in the library's order
        assert panel.methods_for_task(task) == tuple(m for m in METHODS if task in METHOD_TASKS[m])
        for method in panel.methods_for_task(task):
            ReconstructOptions(task=task, method=method).validate()
    r = ReconstructOptions
    assert (defaults.task, defaults.views, defaults.acceleration, defaults.mask, defaults.simulate,
            defaults.data_consistency) == (r.task, r.views, r.acceleration, r.mask, r.simulate, r.data_consistency)
    for name in ("views", "acceleration"):
        assert (fields[name].metadata["min"], fields[name].metadata["max"]) == r.spec(name).bound.int_range()
    # The smallest value the panel offers is one the library accepts (acceleration 2, not 1).
    ReconstructOptions(acceleration=fields["acceleration"].metadata["min"], views=fields["views"].metadata["max"],
                       steps=fields["steps"].metadata["max"]).validate()
    assert panel.parse_size("64 x 48 x 32") == (64, 48, 32)


def test_slicer_widgets_match_the_parameters(panel) -> None:
    """The .ui file's spin boxes and combo boxes offer exactly the parameters' ranges and choices."""
    ui = ET.parse(REPO / "MedDiffusion" / "Resources" / "UI" / "MedDiffusion.ui").getroot()
    widgets = {w.get("name"): w for w in ui.iter("widget")}
    fields = {f.name: f for f in dataclasses.fields(panel.MedDiffusionParameters)}
    defaults = panel.MedDiffusionParameters()

    def prop(widget, name):
        for p in widget.findall("property"):
            if p.get("name") == name:
                return int(p.find("number").text)
        return {"minimum": 0, "maximum": 99}.get(name)  # Qt's defaults

    for name in ("steps", "seed", "views", "acceleration"):
        spin = widgets[f"{name}SpinBox"]
        meta = fields[name].metadata
        assert (prop(spin, "minimum"), prop(spin, "maximum")) == (meta["min"], meta["max"]), name
        if name != "seed":
            assert prop(spin, "value") == getattr(defaults, name), name
    for name in ("sampler", "task", "mask"):
        items = widgets[f"{name}ComboBox"].findall("item")
        assert len(items) == len(fields[name].metadata["choices"]), name
    # The method list depends on the task: the widget fills it from the library (no second list in the .ui).
    assert widgets["methodComboBox"].findall("item") == []


@pytest.mark.parametrize("argv, options", [
    (["generate", "--anatomy", "ct-legs", "--steps", "0", "--out", "x.nrrd"],
     GenerateOptions(anatomy="ct-legs", steps=0)),
    (["generate", "--anatomy", "ct-legs", "--sampler", "euler", "--out", "x.nrrd"],
     GenerateOptions(anatomy="ct-legs", sampler="euler")),
    (["reconstruct", "--task", "mri", "--acceleration", "1", "--input", "in.nrrd", "--out", "x.nrrd"],
     ReconstructOptions(task="mri", acceleration=1)),
    (["reconstruct", "--task", "sparse-ct", "--views", "2049", "--input", "in.nrrd", "--out", "x.nrrd"],
     ReconstructOptions(views=2049)),
])
def test_cli_refuses_with_the_library_message_before_loading(argv, options, tmp_path, capsys) -> None:
    """A bad value is refused with the options' message before the model (here: a missing folder) or the input
    is touched."""
    from MedDiffusionLib.cli import main as cli_main
    from MedDiffusionLib.errors import InputError

    with pytest.raises(InputError) as err:
        options.validate()
    argv = [a if not a.endswith(".nrrd") else str(tmp_path / a) for a in argv]
    assert cli_main(argv + ["--model", str(tmp_path / "no-such-model")]) == 2
    assert capsys.readouterr().err.strip() == f"meddiffusion: error: {err.value}"
