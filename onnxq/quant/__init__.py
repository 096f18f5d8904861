"""What gets quantized how (plan), the numpy reference (primitives), and kernel facts (kernels)."""
