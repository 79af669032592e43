"""The PLAN route: the GAN, its inversion, k-same anchors, the walk and the synthesize stage."""
