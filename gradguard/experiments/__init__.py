"""The experiment harness behind ``gradguard demo``, ``compare`` and ``report``.

Not part of the plugin a training loop uses: data sets (scikit-learn's digits, the
torchvision loaders), demo models, the DP-SGD comparison, plots and reports. It needs
the ``experiments`` extra (``pip install -e ".[experiments]"``).
"""
