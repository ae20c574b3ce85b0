"""The float64 oracle: docs/contract.md in the plainest code (dense, explicit masks, slow).

`reference.tree` builds ball trees by plain recursion; `reference.ops` computes every attention
op densely. Tests compare every backend with them.
"""
