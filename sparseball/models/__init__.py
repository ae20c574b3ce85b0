"""Models composed of `sparseball.nn` layers."""

from .erwin_nsa import ATTENTIONS, ErwinNSA

__all__ = ["ATTENTIONS", "ErwinNSA"]
