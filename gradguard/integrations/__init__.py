"""Integrations with training frameworks (optional extras, imported on demand).

- :mod:`gradguard.integrations.lightning`: ``GradGuardCallback`` for PyTorch Lightning
  (``pip install -e ".[lightning]" from a gradguard checkout``).
- :mod:`gradguard.integrations.huggingface`: ``GradGuardTrainer`` for the Hugging Face
  ``transformers.Trainer`` (``pip install -e ".[huggingface]" from a gradguard checkout``).

This package imports neither framework: import the submodule you need.
"""
