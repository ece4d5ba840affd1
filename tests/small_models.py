"""Small models shared by the tests (imported by name: pytest puts this folder on sys.path)."""
import torch
import torch.nn as nn


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Two conv + BatchNorm + ReLU stages, global pooling and a linear head (4 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
