"""Circuits: path patching, circuit evaluation with edge masks, Pareto curves, AND/OR and backup
probes -- the confirmatory regime of activation patching, each a vectorised JAX program.

Nodes and edges are those of :class:`jaxpatch.edges.EdgeGraph` (``embed``, ``L{l}H{h}``,
``MLP{l}`` write; ``L{l}H{h}.q/.k/.v``, ``MLP{l}.in``, ``logits`` read).
"""

from ._graph import circuit_from_nodes as circuit_from_nodes, edge_mask as circuit_mask  # noqa: F401
from .evaluate import CircuitResult as CircuitResult, evaluate_circuit as evaluate_circuit  # noqa: F401
from .path_patch import path_patch as path_patch  # noqa: F401
