"""The NB log density as PyTensor graphs: the model's likelihood, in the dense zero part and the
count part of a minibatch of cells, or as PyMC's ``NegativeBinomial`` over sampled entries."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.compile.builders import OpFromGraph

# Beyond this dispersion the NB is the Poisson to float precision, and PyMC's NegativeBinomial
# switches to the Poisson there too. Capping it keeps a draw in the far tail of a weakly informed
# gene's dispersion from overflowing the float32 gradient of the dense part (alpha times the
# minibatch scale) or cancelling lgamma(y + alpha) - lgamma(alpha) to noise.
MAX_LOG_ALPHA = float(np.log(1e10))


class DenseZeroPart(OpFromGraph):
    """``sum_g alpha_g sum_i softplus(x_gi)`` over a block's genes x cells, as one op: PyTensor
    evaluates and differentiates its inner graph, and the JAX engine gives it a form that
    computes its value and derivatives in one pass over tiles of genes
    (:func:`scnbvi.likelihood.jax_form.jax_dense_zero_part`)."""


def dense_zero_part(gene_log_odds, cell_log_rate, alpha, beta=None, covariates=None):
    """The dense part of the NB log likelihood, up to its sign, with ``x_gi = gene_log_odds_g +
    cell_log_rate_i (+ beta_g . covariates_i)``, in float32 genes x cells (each gene's sum runs
    along contiguous memory; a block's per-gene sums stay accurate to ~1e-6) and summed over
    the genes in float64."""
    inputs = [gene_log_odds.type(), cell_log_rate.type(), alpha.type()]
    if beta is not None:
        inputs += [beta.type(), covariates.type()]
    log_odds = inputs[0][:, None] + inputs[1][None, :]
    if beta is not None:
        # Genes x cells straight away in float32: no float64 block and no transpose.
        log_odds = log_odds + pt.dot(inputs[3], inputs[4].T)
    total = pt.sum(inputs[2] * pt.cast(pt.sum(pt.softplus(log_odds), axis=1), "float64"))
    arguments = [gene_log_odds, cell_log_rate, alpha] + ([] if beta is None else [beta, covariates])
    return DenseZeroPart(inputs, [total], name="dense_zero_part")(*arguments)


class CountPart(OpFromGraph):
    """The count-dependent part of the NB log likelihood over a block's non-zero entries, as
    one op: its log-gamma functions only ever see positive arguments, and the JAX engine
    evaluates them in a form for those alone (:func:`scnbvi.likelihood.jax_form.jax_count_part`)."""


def count_terms(log_mu, alpha, log_alpha, counts, gammaln=pt.gammaln, logaddexp=pt.logaddexp):
    """Per non-zero entry ``lgamma(y+alpha) - lgamma(alpha) - lgamma(y+1) + y*(log mu - log(alpha + mu))``;
    the JAX form of the count part passes its own ``gammaln`` and ``logaddexp``."""
    return (gammaln(counts + alpha) - gammaln(alpha) - gammaln(counts + 1.0)
            + counts * (log_mu - logaddexp(log_alpha, log_mu)))


def count_part(log_mu, alpha, log_alpha, counts):
    """The sum of :func:`count_terms` as a :class:`CountPart` (``alpha`` and ``log_alpha``
    per entry or scalars)."""
    inputs = [v.type() for v in (log_mu, alpha, log_alpha, counts)]
    return CountPart(inputs, [pt.sum(count_terms(*inputs))], name="count_part")(log_mu, alpha, log_alpha, counts)


def sparse_block_nb_logp(cell_log_rate, gene_log_rate, alpha, nz_row, nz_gene, nz_count, jax_forms=False,
                         covariates=None, beta=None):
    """Sum of NB(y | mu, alpha) log-probabilities over a block of cells x genes, zeros included,
    where ``log mu_ig = cell_log_rate_i + gene_log_rate_g (+ covariates_i . beta_g)``.

    Split so that only the count-independent part touches every entry of the block:
    ``-alpha*log(1 + mu/alpha)`` for every entry, plus
    ``lgamma(y+alpha) - lgamma(alpha) - lgamma(y+1) + y*(log mu - log(alpha + mu))`` for the
    non-zero entries only. ``alpha`` is a scalar or one value per gene, capped at
    ``exp(MAX_LOG_ALPHA)`` (the Poisson limit). Padding entries with
    count 0 add exactly zero. ``jax_forms`` puts the dense part (in float32) and the count
    part in the ops that the JAX engine gives forms of its own; the plain graph is fastest in C.
    """
    log_alpha = pt.minimum(pt.log(alpha), MAX_LOG_ALPHA)
    alpha = pt.exp(log_alpha)
    if jax_forms:
        covariate_parts = [] if beta is None else [pt.cast(beta, "float32"), pt.cast(covariates, "float32")]
        zero_part = -dense_zero_part(pt.cast(gene_log_rate - log_alpha, "float32"), pt.cast(cell_log_rate, "float32"),
                                     pt.broadcast_to(alpha, gene_log_rate.shape), *covariate_parts)
    else:
        if beta is not None:
            log_odds = cell_log_rate[:, None] + (gene_log_rate - log_alpha)[None, :] + pt.dot(covariates, beta.T)
            per_gene = pt.sum(pt.log1p(pt.exp(log_odds)), axis=0)
        else:
            # mu/alpha factorises as exp(cell) * exp(gene - log alpha): one log1p per entry, the
            # fastest form for PyTensor's C backend.
            odds = pt.exp(cell_log_rate)[:, None] * pt.exp(gene_log_rate - log_alpha)[None, :]
            per_gene = pt.sum(pt.log1p(odds), axis=0)
        zero_part = -pt.sum(alpha * per_gene)
    nz_log_mu = cell_log_rate[nz_row] + gene_log_rate[nz_gene]
    if beta is not None:
        # Per non-zero entry from the few covariates, not gathered from a dense block.
        nz_log_mu = nz_log_mu + pt.sum(covariates[nz_row] * beta[nz_gene], axis=1)
    nz_alpha, nz_log_alpha = (alpha[nz_gene], log_alpha[nz_gene]) if alpha.ndim else (alpha, log_alpha)
    nz_terms = (nz_log_mu, nz_alpha, nz_log_alpha, nz_count)
    counted = count_part(*nz_terms) if jax_forms else pt.sum(count_terms(*nz_terms))
    return zero_part + counted


def observed_entries(name, log_mu, alpha, counts, total_size):
    """The NB likelihood of a minibatch of (gene, cell, count) entries, as PyMC's observed
    ``NegativeBinomial`` scaled to ``total_size`` entries (the ``entries`` layout)."""
    return pm.NegativeBinomial(name, mu=pt.exp(log_mu), alpha=alpha, observed=counts, total_size=total_size)
