"""A teacher teaches on unlabeled out-of-distribution data: the MNIST example (see README.md)."""
