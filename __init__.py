"""tml: recommendation ranking and graph embeddings on PyTorch + TorchRec."""
