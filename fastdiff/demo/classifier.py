"""A small CNN classifier of the 16x16 digits; its penultimate features are the feature
space of the demo's quality metrics (Fréchet distance, KID), as Inception's are for FID."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    """(B, 1, 16, 16) in [-1, 1] -> logits (B, 10); `features` gives the (B, feature_dim) penultimate layer."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.width, self.feature_dim, self.num_classes = width, feature_dim, num_classes
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)                  # 16x16
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)    # 8x8
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)          # 8x8
        self.conv4 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)  # 4x4
        self.fc = nn.Linear(4 * w * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)
        # per-feature mean and std over the training split, set after training: the metric
        # features are standardised so FD/KID have a data-independent scale.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def activations(self, x: torch.Tensor) -> list:
        """The four convolutions' ReLU outputs (B, C_l, H_l, W_l): the layers of the perceptual distance."""
        out = []
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
            out.append(x)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # pre-activation: dense features, better-conditioned covariances
        return self.fc(self.activations(x)[-1].flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))


class FeatureExtractor(nn.Module):
    """The classifier's penultimate features as a torchmetrics `feature=` module: float images
    in [-1, 1] (use the metric with `normalize=True`) -> (B, num_features) features, standardised
    with the training split's per-feature mean and std."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            c = self.classifier
            f = c.features(x.to(c.feature_mean.dtype))
            return (f - c.feature_mean) / c.feature_std
