"""The site's side of the Flower federation: the ClientApp, its task functions, baselines, the SuperNode."""
