"""The model's PyTensor log density turned into JAX functions the JAX engine can drive.

The data containers become inputs (so each step passes its own minibatch instead of the
constants that jaxification would bake in), and the per-cell variable's read ``c[cell_index]``
becomes an input too, so a step touches only the minibatch's cells.
"""

from __future__ import annotations

import tempfile

import pymc as pm
import pytensor.tensor as pt

from scnbvi.likelihood.jax_form import register_likelihood_parts


def batch_inputs(model: pm.Model, container_names) -> dict:
    """Symbolic stand-ins for the data containers, so each step can pass its own minibatch
    instead of the constants that jaxification would bake in."""
    containers = [model[name] for name in container_names]
    inputs = [pt.tensor(name=f"{c.name}_batch", dtype=c.dtype, shape=(None,) * c.ndim) for c in containers]
    return dict(zip(containers, inputs))


def jaxify(inputs, outputs):
    """A PyTensor graph as a JAX function, like ``pymc.sampling.jax.get_jaxified_graph``, with
    the likelihood's dense and count parts in their own JAX forms
    (:func:`scnbvi.likelihood.jax_form.register_likelihood_parts`)."""
    from pytensor.compile.mode import JAX
    from pytensor.compile.sharedvalue import SharedVariable
    from pytensor.graph import FunctionGraph
    from pytensor.graph.replace import clone_replace
    from pytensor.graph.traversal import graph_inputs
    from pytensor.link.jax.dispatch import jax_funcify

    # Shared variables left in the graph (dimension lengths) become constants.
    shared = [v for v in graph_inputs(outputs) if isinstance(v, SharedVariable)]
    outputs = clone_replace(outputs, replace={v: pt.constant(v.get_value(borrow=True)) for v in shared})
    register_likelihood_parts()
    fgraph = FunctionGraph(inputs=inputs, outputs=outputs, clone=True)
    JAX.optimizer.rewrite(fgraph)
    # PyTensor writes the source of each function it generates to a temporary file that it never
    # deletes; made in a directory of its own, they go with it.
    with tempfile.TemporaryDirectory(prefix="scnbvi-jax-") as scratch:
        default, tempfile.tempdir = tempfile.tempdir, scratch
        try:
            return jax_funcify(fgraph)
        finally:
            tempfile.tempdir = default



def jax_logp(model: pm.Model, container_names):
    """The model's log density (Jacobian included) as a JAX function of (values..., batch...)."""
    from pytensor.graph.replace import graph_replace

    inputs = batch_inputs(model, container_names)
    logp = graph_replace(model.logp(jacobian=True), inputs, strict=False)
    return jaxify(model.value_vars + list(inputs.values()), [logp])


def cell_variable(model: pm.Model):
    """The per-cell latent variable (dims ``cell``), which must be Normal a priori."""
    from pytensor.tensor.random.basic import NormalRV

    rv = next(rv for rv in model.free_RVs if model.named_vars_to_dims.get(rv.name) == ("cell",))
    if not isinstance(rv.owner.op, NormalRV):
        raise ValueError(f"the per-cell variable {rv.name} must be Normal a priori")
    return rv


def read_at(outputs, index, length: int):
    """Per-cell ``outputs`` (elementwise in their inputs of ``length``) read at ``index``: each
    such constant is indexed first, so the graph, and its gradient, cost O(len(index)); the
    gradient of a full-length graph read afterwards scatters into ``length`` entries."""
    from pytensor.graph.replace import clone_replace
    from pytensor.graph.traversal import ancestors, applys_between
    from pytensor.tensor.elemwise import DimShuffle, Elemwise
    from pytensor.tensor.variable import TensorConstant

    per_cell = [v for v in ancestors(outputs) if isinstance(v, TensorConstant) and v.type.shape == (length,)]
    if any(not isinstance(node.op, Elemwise | DimShuffle) for node in applys_between(per_cell, outputs)):
        raise ValueError("the per-cell prior's location and scale must be elementwise in the cells")
    read = clone_replace(outputs, replace={v: v[index] for v in per_cell}, rebuild_strict=False)
    return [pt.broadcast_to(v, index.shape) for v in read]


def minibatch_logp(model: pm.Model, container_names):
    """The model's log density without the per-cell prior, as a JAX function of
    (global values..., cells' values as read by the minibatch, batch...), and the location
    and scale of that Normal prior as a JAX function of (global values..., cell indices).

    The likelihood must read the per-cell variable only as ``c[cell_index]``; that read
    becomes an input, so a step draws and differentiates only the minibatch's cells. Their
    Normal prior has a closed-form expectation under q and is added by the engine.
    """
    from pytensor.graph.replace import graph_replace
    from pytensor.graph.traversal import ancestors

    cell_rv = cell_variable(model)
    cell_value = model.rvs_to_values[cell_rv]
    global_rvs = [rv for rv in model.free_RVs if rv is not cell_rv]
    logp = model.logp(vars=global_rvs + model.observed_RVs + model.potentials, jacobian=True)
    reads = [v for v in ancestors([logp]) if v.owner is not None and cell_value in v.owner.inputs]
    if any(len(v.owner.inputs) != 2 or v.owner.inputs[1] is not model["cell_index"] for v in reads):
        raise ValueError(f"the likelihood must read {cell_value.name} only as {cell_value.name}[cell_index]")
    cells_read = pt.vector(f"{cell_value.name}_read", dtype=cell_value.dtype)
    logp = graph_replace(logp, {v: cells_read for v in reads}, strict=False)
    inputs = batch_inputs(model, container_names)
    logp = graph_replace(logp, inputs, strict=False)
    global_values = [model.rvs_to_values[rv] for rv in global_rvs]
    function = jaxify(global_values + [cells_read] + list(inputs.values()), [logp])
    location, scale = model.replace_rvs_by_values(cell_rv.owner.inputs[-2:])
    cells = pt.ivector("cells")
    prior = jaxify(global_values + [cells], read_at([location, scale], cells, cell_value.type.shape[0]
                                                    or model.initial_point()[cell_value.name].size))
    return function, prior, global_values, cell_value
