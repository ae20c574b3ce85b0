"""Tasks with exact targets, generated on the fly (no dataset to download).

Each task returns a `PointCloudBatch`: plain tensors in the packed `pos, batch, x, y`
convention of torch_geometric, seeded per `(seed, rank, step)`.

- `gravity`: clustered point masses; `y` is the exact softened (optionally Yukawa-screened)
  gravitational acceleration of each point from the rest of its cloud.
"""

from .batch import PointCloudBatch
from .gravity import gravitational_acceleration, gravity, stream_seed

__all__ = ["PointCloudBatch", "gravitational_acceleration", "gravity", "stream_seed"]
