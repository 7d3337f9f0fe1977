"""Small reference models and user models by dotted path (``package.module:Class``).

    model = build_model("cnn1d", dataset)          # or build_model("mypkg.nets:Net", dataset, width=64)
"""

from fedpower.models.reference import MODEL_NAMES, ModelError, build_model, count_parameters

__all__ = ["MODEL_NAMES", "ModelError", "build_model", "count_parameters"]
