"""The ELBO's pieces shared by the engines and the benchmark: the flat parameter layout,
Gaussian entropies, common random numbers and a full-data ELBO to compare fits by."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pymc as pm
import scipy.sparse as sp

from scnbvi.inference.result import FitResult
from scnbvi.inference.settings import InferenceSettings


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of a model's free (unconstrained) variables, in the model's order,
    and the map between a dict of arrays and one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_model(cls, model: pm.Model, value_vars=None) -> ParameterLayout:
        point = model.initial_point()
        names = tuple(v.name for v in (model.value_vars if value_vars is None else value_vars))
        return cls(names, tuple(point[name].shape for name in names))

    @property
    def bounds(self) -> np.ndarray:
        return np.cumsum([0, *(int(np.prod(shape, dtype=int)) for shape in self.shapes)])

    @property
    def size(self) -> int:
        return int(self.bounds[-1])

    def split(self, flat) -> dict:
        """One array per variable from a flat vector (NumPy or JAX)."""
        bounds = self.bounds
        return {name: flat[bounds[k] : bounds[k + 1]].reshape(shape)
                for k, (name, shape) in enumerate(zip(self.names, self.shapes))}

    def flatten(self, values: dict) -> np.ndarray:
        return np.concatenate([np.ravel(values[name]) for name in self.names])


def gaussian_entropy(stds: np.ndarray) -> float:
    """Entropy of a diagonal Gaussian with these standard deviations."""
    return float(np.sum(np.log(stds)) + 0.5 * stds.size * (1.0 + math.log(2 * math.pi)))


def fixed_normal_draws(n_samples: int, dim: int, seed: int) -> np.ndarray:
    """Common random numbers for a low-noise ELBO estimate that can be compared across checks."""
    return np.random.default_rng([seed, 7]).standard_normal((n_samples, dim))


# Genes x cells entries of a block of whole cells that a check, or a step of the closing
# sweep, takes at once.
BLOCK_ENTRIES = 4_000_000


def cells_per_block(n_genes: int, low: int, high: int) -> int:
    """Cells whose genes x cells entries come to about :data:`BLOCK_ENTRIES`, within bounds."""
    return int(min(high, max(low, BLOCK_ENTRIES // max(n_genes, 1))))


def evaluation_cells(settings: InferenceSettings, n_genes: int) -> int:
    """Cells for the fixed-cells ELBO, capped so the check stays cheap for wide matrices."""
    return cells_per_block(n_genes, 32, settings.eval_cells)


def full_data_elbo(counts: sp.csr_matrix, cell_log_offset, gene_log_offset, result: FitResult, *,
                   gene_dispersion: bool = True, samples: int = 32, seed: int = 123) -> float:
    """The ELBO of a fit on every cell, with fixed draws: the same yardstick for every fit,
    whichever engine, layout or minibatch produced it."""
    import jax
    import jax.numpy as jnp

    from scnbvi.batches import BATCH_LAYOUT, cell_block
    from scnbvi.inference.jax_graph import jax_logp
    from scnbvi.model import build_model, cell_centring_weights

    counts = sp.csr_matrix(counts)
    model = build_model(cell_log_offset=cell_log_offset, gene_log_offset=gene_log_offset,
                        batch_size=counts.shape[0], gene_dispersion=gene_dispersion,
                        cell_centring=cell_centring_weights(counts, cell_log_offset))
    layout = ParameterLayout.from_model(model)
    names = tuple(BATCH_LAYOUT["cells"])
    logp = jax_logp(model, names)
    batch = cell_block(counts, np.arange(counts.shape[0]))
    data = [jnp.asarray(batch[name]) for name in names]
    mean = layout.flatten(result.means)
    std = layout.flatten(result.stds)

    @jax.jit
    def at(flat):
        values = layout.split(flat)
        return logp(*(values[name] for name in layout.names), *data)[0]

    draws = fixed_normal_draws(samples, mean.size, seed=seed)
    return float(np.mean([at(mean + std * eps) for eps in draws])) + gaussian_entropy(std)
