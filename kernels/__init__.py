"""Triton kernels of ogpsa (installed as ``ogpsa.kernels``).

Multi-tensor kernels for the projection passes (:mod:`.projection`) and basis building
(:mod:`.basis`), addressed through int64 pointer tables (:mod:`.tables`). Importing this
package imports Triton; under ``TRITON_INTERPRET=1`` (set before Triton is first imported)
the kernels run on CPU tensors through Triton's interpreter, which is how CI tests them.
The :class:`ogpsa.backends.triton_backend.TritonBackend` is the public way to use them.
"""

from .common import INTERPRETED, KIND, launch, launch_config, segment_sum
from .tables import ChunkTable, TableCache, build_table, tensor_key

__all__ = ["INTERPRETED", "KIND", "ChunkTable", "TableCache", "build_table", "launch", "launch_config", "segment_sum",
           "tensor_key"]
