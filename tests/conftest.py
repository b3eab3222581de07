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
