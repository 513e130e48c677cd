from .base import Technique, knob, to_dict
from .registry import all_techniques, get, technique

__all__ = ["Technique", "knob", "to_dict", "all_techniques", "get", "technique"]
