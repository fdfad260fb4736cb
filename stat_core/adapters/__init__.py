from .base import LayerShape, ModelAdapter
from .registry import UnsupportedModelError, get_adapter, supported_model_types

__all__ = ["LayerShape", "ModelAdapter", "UnsupportedModelError", "get_adapter", "supported_model_types"]
