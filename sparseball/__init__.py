"""sparseball: ball-tree sparse attention kernels for point clouds.

`build_tree` sorts point clouds into a ball tree of slots; `sparseball.ops` holds the attention
ops on slot-ordered tensors; `attention` mixes them as Native Sparse Attention.
"""

from . import ops
from .backends import BACKENDS, default_backend, use_backend
from .mixture import attention
from .tree import BallTree, build_tree

__all__ = [
    "BACKENDS",
    "BallTree",
    "attention",
    "build_tree",
    "default_backend",
    "ops",
    "use_backend",
]
# The one place of the version: pyproject.toml reads it from here (a literal, read without
# importing) for the package metadata.
__version__ = "0.1.0"
