"""The CVAE route: frozen embedders, the embedding cache, the conditional VAE, its DP and federated variants."""
