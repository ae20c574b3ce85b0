"""Layers built on the public ops: attention over slot-ordered point features and the blocks
around it. Each takes `[M, dim]` features in the slot order of the `BallTree` it is given."""

from .attention import BallAttention, BallNSA, CloudAttention
from .layers import FourierFeatures, LeafMessagePassing, SwiGLU

__all__ = [
    "BallAttention",
    "BallNSA",
    "CloudAttention",
    "FourierFeatures",
    "LeafMessagePassing",
    "SwiGLU",
]
