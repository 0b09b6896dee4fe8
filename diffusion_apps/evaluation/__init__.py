"""Evaluation: generation metrics in the digits or Inception feature space, reconstruction metrics.

Importing this package builds no network and reads no weights: that happens on first use.
"""

from diffusion_apps.evaluation.digits import DigitClassifier, digit_classifier
from diffusion_apps.evaluation.inception import inception_feature_extractor, standard_metrics
from diffusion_apps.evaluation.metrics import (
    FeatureStats,
    frechet_distance,
    inception_score,
    kernel_distance,
    mean_cov,
    precision_recall,
)
from diffusion_apps.evaluation.reconstruction import ReconstructionMetrics
from diffusion_apps.evaluation.reference import real_floor, reference_features

__all__ = [
    "DigitClassifier",
    "FeatureStats",
    "ReconstructionMetrics",
    "digit_classifier",
    "real_floor",
    "frechet_distance",
    "inception_feature_extractor",
    "inception_score",
    "kernel_distance",
    "mean_cov",
    "precision_recall",
    "reference_features",
    "standard_metrics",
]
