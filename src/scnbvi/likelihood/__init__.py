"""The Negative-Binomial likelihood, in one place: its log density in PyTensor (the model's graph,
:mod:`.pytensor_form`), the JAX forms of that graph's two parts (:mod:`.jax_form`), its sampler
(:mod:`.sampling`) and its zero probability and cumulants (:mod:`.moments`).

y ~ NB(mu, alpha) has mean ``mu`` and variance ``mu + mu^2 / alpha``: scipy's ``nbinom`` with
``n = alpha`` and ``p = alpha / (alpha + mu)``. A variant of the likelihood changes this package
alone. Each form is its own module so that each user imports only its own: the simulator needs
neither PyTensor nor JAX, the model no JAX.
"""
