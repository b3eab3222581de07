"""Multi-run procedures over a LightningModule: soups from checkpoints, the WARP loop, sparse
model soups. Each drives the user's own Trainer and module and writes atomically under a folder
so an interrupted run resumes."""

from lightning_ext.workflows.soup import SoupResult, build_soup, run_soup
from lightning_ext.workflows.sparse_soup import FixedMask, SparseSoupResult, sparse_model_soup
from lightning_ext.workflows.warp import WARPResult, WARPRun, run_warp

__all__ = [
    "FixedMask",
    "SoupResult",
    "SparseSoupResult",
    "WARPResult",
    "WARPRun",
    "build_soup",
    "run_soup",
    "run_warp",
    "sparse_model_soup",
]
