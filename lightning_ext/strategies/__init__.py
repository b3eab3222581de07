"""Lightning strategies (DDPStrategy subclasses) for methods that run one model per rank."""

from lightning_ext.strategies.soup import SoupStrategy

__all__ = ["SoupStrategy"]
