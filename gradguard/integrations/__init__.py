"""Integrations with training frameworks (optional extras, imported on demand).

- :mod:`gradguard.integrations.lightning`: ``GradGuardCallback`` for PyTorch Lightning
  (``pip install gradguard[lightning]``).
- :mod:`gradguard.integrations.huggingface`: ``GradGuardTrainer`` for the Hugging Face
  ``transformers.Trainer`` (``pip install gradguard[huggingface]``).

This package imports neither framework: import the submodule you need.
"""
