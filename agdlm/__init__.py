"""agdlm: train nanoGPT-style GPTs with Automatic Gradient Descent, side by side with AdamW."""

__version__ = "0.1.0"
