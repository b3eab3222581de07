"""lightning-ext: research training methods as drop-in Lightning callbacks and strategies."""

__version__ = "0.1.0"
