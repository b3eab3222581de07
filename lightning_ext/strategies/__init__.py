"""Lightning strategies (DDPStrategy subclasses) for methods that run one model per rank."""

from lightning_ext.strategies.soup import SoupStrategy
from lightning_ext.strategies.warp import WARPStrategy

__all__ = ["SoupStrategy", "WARPStrategy"]
