"""Fixed rotations for the rotated orderings of a ball tree."""

from __future__ import annotations

import math

import numpy as np

# Successive orderings differ by the golden angle, so no two of them coincide (mod 2*pi).
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def rotation_matrix(r: int, dim: int) -> np.ndarray:
    """float64 `[dim, dim]` orthogonal matrix of rotated ordering r.

    The product of Givens rotations by `pi/4 + r * GOLDEN_ANGLE` in every axis plane (i, j),
    i < j, in lexicographic order; r = 0 is Erwin's 45-degree rotation. Rotated positions are
    `pos @ rotation_matrix(r, dim).T`. For dim = 1 it is the identity.
    """
    angle = math.pi / 4 + r * GOLDEN_ANGLE
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.eye(dim)
    for i in range(dim):
        for j in range(i + 1, dim):
            givens = np.eye(dim)
            givens[i, i] = givens[j, j] = c
            givens[i, j], givens[j, i] = -s, s
            rotation = givens @ rotation
    return rotation
