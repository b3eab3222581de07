import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cwd_tmp(tmp_path, monkeypatch):
    """Keep lightning_logs/ and wandb/ out of the repository."""
    monkeypatch.chdir(tmp_path)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where a GPU is (``make test-gpu``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run by `make test-gpu` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tested_versions() -> str:
    """The versions this run tested (CI installs the newest releases the bounds allow)."""
    from importlib import metadata

    found = []
    for name in ("torch", "lightning", "pytorch-lightning", "torchmetrics"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return "lightning-ext tested against: " + ", ".join(found)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Printed last, also under ``-q`` (which hides the report header), so every CI log says it."""
    terminalreporter.write_line(tested_versions())
