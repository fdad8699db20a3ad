"""Per-example losses for sequence models, summed so that each example's own loss is
well defined (what GNQ's g_j = ∇θ ℓ(θ; z_j) needs).

Hugging Face models return ``loss`` as the *mean over every non-ignored token of the
batch*: N = Σ_j n_j tokens, loss = Σ_j Σ_t ℓ_jt / N. The functions here return the sum
Σ_j ℓ_j with ℓ_j = Σ_t ℓ_jt, example j's summed token loss (``loss_reduction="sum"``),
so ``causal_lm_loss(logits, labels) == model(..., labels=labels).loss * N``. With the HF
loss itself and ``loss_reduction="mean"``, GradGuard's per-example gradient is
(B / N)·∇ℓ_j: the gradient of example j's *mean* token loss when every example has
the same number of tokens n = N / B, and a padding-dependent rescaling of it otherwise.
Use these sums when sequences are padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "token_classification_loss"]


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, *,
                              ignore_index: int = -100) -> torch.Tensor:
    """Σ over examples and positions of the token cross-entropy; ``ignore_index`` labels
    (padding) contribute nothing.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` target ids, ``ignore_index`` where no loss is taken.
        ignore_index: the label that marks positions without loss (Hugging Face: -100).

    Returns:
        A 0-d tensor: the sum of every example's summed token loss.

    Example:
        >>> logits, labels = torch.zeros(2, 3, 4), torch.tensor([[1, 2, -100], [0, 0, 0]])
        >>> token_classification_loss(logits, labels) / torch.log(torch.tensor(4.0))  # 5 tokens
        tensor(5.)
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *,
                   ignore_index: int = -100) -> torch.Tensor:
    """Next-token loss summed over examples and positions, with the causal shift: position
    t predicts ``labels[:, t + 1]``, as Hugging Face causal LMs compute ``loss``.

    Equals ``model(input_ids, labels=labels).loss`` times the number of non-ignored
    shifted labels (the module doc says how that relates to per-example gradients).

    Args:
        logits: ``[B, T, V]`` from the model.
        labels: ``[B, T]``, usually the input ids with padding set to ``ignore_index``.
        ignore_index: the label that marks positions without loss (Hugging Face: -100).

    Returns:
        A 0-d tensor.

    Example:
        >>> logits, labels = torch.zeros(1, 3, 5), torch.tensor([[4, 1, -100]])
        >>> causal_lm_loss(logits, labels) / torch.log(torch.tensor(5.0))  # 1 shifted token
        tensor(1.)
    """
    return token_classification_loss(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index)
