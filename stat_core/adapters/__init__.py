from stat_core.adapters.base import LayerShape, ModelAdapter
from stat_core.adapters.registry import (
    UnsupportedModelError,
    get_adapter,
    supported_model_types,
)

__all__ = ["LayerShape", "ModelAdapter", "UnsupportedModelError", "get_adapter", "supported_model_types"]
