"""The pure-PyTorch backend: every op on CPU and CUDA, float64/32/16/bf16, autograd backward."""
