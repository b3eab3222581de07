"""Shared test helpers: tiny models and data, the resume-exactness harness, the DDP runner, and the
wandb offline reader. Every callback's tests use these."""
