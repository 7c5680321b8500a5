"""Explicit model loading: no silent random network, ``--weights random`` on purpose, a
download announced (with where the file goes) before it starts and a clear error offline."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch

from fastsal import cli
from fastsal.jobs import models

tv = pytest.importorskip("torchvision")


def _tv_api():
    import importlib

    return importlib.import_module("torchvision.models._api")


def test_torchvision_model_without_weights_is_refused(tmp_path, capsys):
    code = cli.main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "resnet50", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--model resnet50 needs --weights" in err and "--weights random" in err
    assert "IMAGENET1K_V2" in err and "state dict" in err
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written


def test_topk_refuses_too(tmp_path, capsys):
    code = cli.main(["topk", str(tmp_path), "--layer", "layer1", "--channel", "0", "--out", str(tmp_path / "t.png"),
                     "--model", "resnet18"])
    assert code == 2 and "--weights random" in capsys.readouterr().err


def test_random_weights_on_purpose_are_recorded():
    loaded = models.load_model("resnet18", "random")
    assert isinstance(loaded.model, torch.nn.Module) and not loaded.model.training
    assert "random weights" in loaded.description and loaded.class_names is None
    # the embedded model keeps its trained weights by default and can be randomized on request
    trained = models.load_model(None)
    rand = models.load_model(None, "random")
    assert "random" in rand.description and "random" not in trained.description
    a, b = trained.model.state_dict(), rand.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_a_download_is_announced_and_its_failure_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(("download", url))
        raise urllib.error.URLError("no network")

    # torchvision fetches through its own import of torch.hub's downloader
    monkeypatch.setattr(_tv_api(), "load_state_dict_from_url", offline)
    lines = []
    with pytest.raises(RuntimeError) as info:
        models.load_model("resnet18", "IMAGENET1K_V1", notify=lambda line: (lines.append(line), calls.append("note")))
    target = os.path.join(str(tmp_path / "hub"), "checkpoints", "resnet18-f37072fd.pth")
    assert calls[0] == "note" and calls[1][0] == "download"  # said before it started
    assert target in lines[0] and "downloading https://download.pytorch.org/models/resnet18-f37072fd.pth" in lines[0]
    message = str(info.value)
    assert "no network" in message and target in message and "--weights PATH" in message


def test_a_cached_file_is_not_announced(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    os.makedirs(tmp_path / "checkpoints")
    net = tv.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(_tv_api(), "load_state_dict_from_url",
                        lambda url, *a, **k: torch.load(tmp_path / "checkpoints" / os.path.basename(url)))
    lines = []
    loaded = models.load_model("resnet18", "IMAGENET1K_V1", notify=lines.append)
    assert lines == [] and "IMAGENET1K_V1" in loaded.description


def test_bad_weights_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"IMAGENET1K_V1, DEFAULT\), nor random"):
        models.load_model("resnet18", "IMAGENET_BOGUS")


def test_timm_model_without_weights_is_refused():
    timm = pytest.importorskip("timm")
    assert timm.is_model("resnet18")
    # torchvision's resnet18 wins the name; a timm-only name goes to timm
    with pytest.raises(ValueError, match=r"--model resnet10t needs --weights: --weights pretrained .* "
                                         r"--weights random"):
        models.load_model("resnet10t")
    assert "random weights" in models.load_model("resnet10t", "random").description


def test_models_module_does_not_import_the_runner():
    """A model server imports fastsal.jobs.models: it must not pull in the job runner. Its
    fastsal imports, and theirs, checked statically (a subprocess import costs ~10 s)."""
    import ast
    import importlib.util

    seen, todo = set(), ["fastsal.jobs.models"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastsal.jobs"):
                todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names if a.name.startswith("fastsal.jobs"))
    assert "fastsal.jobs.models" in seen and not seen & {"fastsal.jobs.runner", "fastsal.jobs.store",
                                                          "fastsal.jobs.sources"}, seen
