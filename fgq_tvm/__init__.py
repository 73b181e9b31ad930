"""fgq-tvm: compile PyTorch CNNs into fine-grained ternary (FGQ) native modules with TVM."""

__version__ = "0.1.0"
