"""Membership-inference audit: metrics, attack scores, one-run auditing and canaries."""

from gradguard.audit.attacks import (
    curvature_attack,
    curvature_attack_scores,
    lira_offline,
    lira_online,
    logit_confidence,
    logit_confidence_from_logits,
    loss_attack_scores,
    per_example_loss,
    shadow_masks,
)
from gradguard.audit.canaries import Canaries, CanaryDataset
from gradguard.audit.metrics import (
    EmpiricalEpsilon,
    empirical_epsilon,
    mia_metrics,
    roc_auc,
    roc_auc_standard_error,
    roc_curve,
    tpr_at_fpr,
)
from gradguard.audit.one_run import one_run_epsilon, one_run_p_value

__all__ = [
    "Canaries",
    "CanaryDataset",
    "EmpiricalEpsilon",
    "curvature_attack",
    "curvature_attack_scores",
    "empirical_epsilon",
    "lira_offline",
    "lira_online",
    "logit_confidence",
    "logit_confidence_from_logits",
    "loss_attack_scores",
    "mia_metrics",
    "one_run_epsilon",
    "one_run_p_value",
    "per_example_loss",
    "roc_auc",
    "roc_auc_standard_error",
    "roc_curve",
    "shadow_masks",
    "tpr_at_fpr",
]
