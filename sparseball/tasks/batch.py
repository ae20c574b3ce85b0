"""`PointCloudBatch`: what every task returns, clouds packed as in torch_geometric."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PointCloudBatch:
    """A batch of point clouds with per-point features and targets, packed along one axis.

    Attributes:
        pos (torch.Tensor): float32 positions of shape `[N, dim]`, N the total number of points.
        batch (torch.Tensor): int64 cloud id of each point, shape `[N]`, sorted: the points of
            cloud 0 come first.
        x (torch.Tensor): float32 input features of shape `[N, F]`.
        y (torch.Tensor): float32 targets of shape `[N, T]`.
        y_unit (float): the unit of `y`: `y * y_unit` is the target in the task's own units.
    """

    pos: torch.Tensor
    batch: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    y_unit: float = 1.0

    def to(self, device: torch.device | str) -> PointCloudBatch:
        """The same batch with every tensor on `device`."""
        return dataclasses.replace(
            self, pos=self.pos.to(device), batch=self.batch.to(device), x=self.x.to(device),
            y=self.y.to(device))

    @property
    def num_points(self) -> int:
        return self.pos.shape[0]
