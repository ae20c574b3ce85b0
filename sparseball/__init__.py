"""sparseball: ball-tree sparse attention kernels for point clouds."""

from .tree import BallTree, build_tree

__all__ = ["BallTree", "build_tree"]
__version__ = "0.1.0"
