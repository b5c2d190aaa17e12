"""Circuits: path patching, circuit evaluation with edge masks, Pareto curves, AND/OR and backup
probes -- the confirmatory regime of activation patching, each a vectorised JAX program.

Nodes and edges are those of :class:`jaxpatch.edges.EdgeGraph` (``embed``, ``L{l}H{h}``,
``MLP{l}`` write; ``L{l}H{h}.q/.k/.v``, ``MLP{l}.in``, ``logits`` read).
"""

from ._graph import circuit_from_nodes as circuit_from_nodes
from ._graph import circuit_mask as circuit_mask
from .evaluate import CircuitResult as CircuitResult
from .evaluate import evaluate_circuit as evaluate_circuit
from .pareto import ParetoCurve as ParetoCurve
from .pareto import ParetoResult as ParetoResult
from .pareto import exact_edge_scores as exact_edge_scores
from .pareto import nested_circuits as nested_circuits
from .pareto import pareto_curve as pareto_curve
from .pareto import plot_pareto as plot_pareto
from .path_patch import path_patch as path_patch
from .probes import BackupResult as BackupResult
from .probes import ProbeResult as ProbeResult
from .probes import and_or_probe as and_or_probe
from .probes import backup_probe as backup_probe
