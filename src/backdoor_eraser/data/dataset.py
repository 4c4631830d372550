"""The in-memory image data set every part of the toolkit passes around."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageDataset:
    """uint8 images (N×C×H×W), int64 labels (N) and class names.

    ``index`` holds each sample's index in the data set it came from (its
    original index), so subsets and poisoned copies can always be traced back.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "dataset"
    index: torch.Tensor | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be a uint8 N×C×H×W tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError("labels must be a 1-D tensor with one label per image")
        self.labels = self.labels.to(torch.int64)
        if self.index is None:
            self.index = torch.arange(len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices, name: str | None = None) -> "ImageDataset":
        """Samples at positions ``indices`` (their ``index`` keeps the original indices)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[idx], self.labels[idx], list(self.classes),
                            name or self.name, self.index[idx])

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


@dataclass
class DataSplits:
    """A data set's train and test parts."""

    train: ImageDataset
    test: ImageDataset
    meta: dict = field(default_factory=dict)
