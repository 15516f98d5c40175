"""Tiny architectures for tests, importable as `nets:tiny_cnn` (tests/ is on sys.path and PYTHONPATH)."""
from torch import nn


def tiny_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(16 * 2 * width, num_classes))


class _Scaled(nn.Module):
    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


def scaled_cnn(num_classes: int = 10, in_channels: int = 1, scale: float = 1e6) -> nn.Module:
    """Logits far outside float16's range, for the overflow error."""
    return _Scaled(tiny_cnn(num_classes, in_channels), scale)


class _Slow(nn.Module):
    def __init__(self, inner: nn.Module, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return self.inner(x)


def slow_cnn(num_classes: int = 10, in_channels: int = 1, seconds: float = 0.05) -> nn.Module:
    """A teacher slow enough that a test can kill the dump mid-run."""
    return _Slow(tiny_cnn(num_classes, in_channels), seconds)


def not_a_network(**kwargs):
    """A factory that returns something other than an nn.Module (refused even when trusted)."""
    return 3
