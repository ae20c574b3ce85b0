"""The Triton backend: fused forward and backward kernels for every op, registered as
`torch.library.triton_op`s (namespace `sparseball_triton`) so `torch.compile` traces them.

`ops.py` holds the backend functions; `ball.py`, `compressed.py`, `selection.py`, `select.py`
and `far_field.py` hold the kernels and their op registrations.
"""
