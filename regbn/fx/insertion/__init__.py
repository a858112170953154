"""Step 7, insertion: `regbn.insert` and `regbn.remove`.

Owns: checking the arguments (`checks`), planning the pairs into layers (`plan`), keeping
only dependent pairs (`dependence`, ``min_dependence=``), one graph per training mode
(`modes`), splicing the layers into the graph (`splice`) and the entry points (`api`).

Reads: everything steps 1-6 wrote (``regbn_module``, ``regbn_module_calls``, ``regbn_tensor``,
``regbn_modalities``, ...).

Writes on nodes: on the inserted layer's call and its two outputs, the keys of steps 1, 2 and
4 (``regbn_module``, ``regbn_module_calls``, ``regbn_output_of``, ``regbn_tensor``,
``regbn_modalities``, ``regbn_fusion``), plus ``regbn_role`` (``"layer"``, ``"f_r"``,
``"g_out"``) and, on the call, ``regbn_pair``. On the graph module: ``meta["regbn_inserted"]``.
"""

from __future__ import annotations

from .api import insert, remove

__all__ = ["insert", "remove"]
