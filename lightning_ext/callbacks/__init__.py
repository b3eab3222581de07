"""Lightning callbacks: thin adapters over ``lightning_ext.functional``."""
