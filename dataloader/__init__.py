"""Sample-level resumable, parallel-aware data loading for heterogeneous multimodal training.

- `dataloader.manifest`: records with media sizes precomputed, and the interface every manifest
  implements; `open_manifest` opens either format: JSONL in memory (small sets) or
  `dataloader.columnar` (memory-mapped columns with the planning layout precomputed, for 10^9
  samples); ``python -m dataloader index`` builds one, ``convert`` turns one into the other;
- `dataloader.validate`: what a record may hold (`Limits`: Keye-VL-1.5's caps by default);
- `dataloader.order` / `dataloader.mixture`: the global order, a pure O(1) function of
  (seed, epoch, position), over a weighted mixture of datasets;
- `dataloader.sequence`: Keye-VL-1.5 prompt format -> token ids, targets, visual-slot layouts;
- `dataloader.loader`: `StepLoader`, one global step at a time, fetching only what each rank's
  role needs, with bad-sample agreement, prefetch and a few-integer state.
"""

import importlib
from typing import Any

_EXPORTS = {
    "dataloader.loader": ("FetchCounters", "LoaderConfig", "SampleRef", "SkippedSample",
                          "StepData", "StepLoader"),
    "dataloader.columnar": ("ColumnarManifest", "PlanningColumns"),
    "dataloader.columnar_writer": ("ColumnarWriter", "write_columnar"),
    "dataloader.manifest": ("Manifest", "MediaRef", "Record", "Turn", "load_manifest",
                            "open_manifest", "read_records", "write_records"),
    "dataloader.mixture": ("Draw", "Mixture"),
    "dataloader.order": ("FeistelPermutation", "GlobalOrder", "epoch_permutation"),
    "dataloader.sequence": ("ByteTokenizer", "HFTokenizer", "Tokenizer", "sample_sizes",
                            "tokenize"),
    "dataloader.state": ("IncompatibleStateError", "LoaderState"),
    "dataloader.validate": ("Limits", "ManifestError"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Lazy exports: ``python -m dataloader index`` does not import torch."""
    if name not in _WHERE:
        raise AttributeError(f"module 'dataloader' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
