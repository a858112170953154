"""Step 4, modality: which inputs each node's value depends on, and where branches fuse.

Owns: the modalities of the inputs (`inputs`: ``modalities=``, token ids, masks), the value
flow that carries them (`value_flow`, `branches`), the kind of each fusion (`kinds`) and the
fusions themselves (`fusions`: `Fusion`, `annotate_modalities`, `detect_fusions`).

Reads: ``regbn_tensor`` (step 2) and the names of inputs and module outputs (step 3).

Writes on nodes: ``regbn_input`` (placeholders and input entries), ``regbn_modalities``,
``regbn_constant``, ``regbn_fusion`` and ``regbn_fusions``.
"""

from __future__ import annotations

from .fusions import Fusion, annotate_modalities, build_graph, detect_fusions

__all__ = ["Fusion", "annotate_modalities", "build_graph", "detect_fusions"]
