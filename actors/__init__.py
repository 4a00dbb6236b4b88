"""Classes that own one model each: loading (dtype, quantization, device) and batched patching.

For notebooks:

    from actors import load_model, Patcher
    from orchestrator.tasks import iter_programs

    lm = load_model("models/binding-tiny")            # or a hub id; quantization="auto"
    table = Patcher(lm).patch(list(iter_programs("binding", 0, 16, 20, style="paper")),
                              sites=["resid_pre", "attn_head"], positions="targets")
    table.to_pandas()

`lm.lm` is the same model wrapped as `nnsight.TransformersModel`, for tracing by hand.
"""

from actors.arch import SITES, ArchMap, arch_map
from actors.attribution import Attributor
from actors.knockout import KNOCKOUT_SCHEMA, Knocker
from actors.loading import LoadedModel, load_model
from actors.patching import PATCHING_SCHEMA, Patcher
from actors.probes import PROBES_SCHEMA, Prober

__all__ = [
    "KNOCKOUT_SCHEMA",
    "PATCHING_SCHEMA",
    "PROBES_SCHEMA",
    "SITES",
    "ArchMap",
    "Attributor",
    "Knocker",
    "LoadedModel",
    "Patcher",
    "Prober",
    "arch_map",
    "load_model",
]
