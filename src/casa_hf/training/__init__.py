"""Training support: synthetic data, a collator with assistant-only labels and packing, freezing recipes."""

from .collator import IGNORE_INDEX, CasaDataCollator
from .freezing import RECIPES, apply_freezing_recipe
from .synthetic_vqa import SyntheticVQA, vocabulary

__all__ = ["IGNORE_INDEX", "RECIPES", "CasaDataCollator", "SyntheticVQA", "apply_freezing_recipe", "vocabulary"]
