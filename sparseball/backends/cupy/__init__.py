"""The CuPy backend: every attention op as CUDA C kernels (kernels/attention.cu) launched through
`cupy.RawModule`; `ops` holds the op functions, `source` the kernels' names and tile shapes."""
