"""scnbvi: hierarchical Negative-Binomial model of single-cell counts, fitted by minibatch ADVI."""

__version__ = "0.1.0"
