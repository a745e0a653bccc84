"""Typed data: the items methods fit on and evaluations run on, their JSONL formats, and default fit data.

>>> from haltrace.data import YesNoQuestion, load_items
>>> YesNoQuestion("is there a cup ?", "no").present
False
"""

from haltrace.data.images import ImageError, open_image
from haltrace.data.items import (
    KINDS,
    CaptionItem,
    CaptionPair,
    EntityQuestion,
    Item,
    PvPItem,
    Statement,
    VQAQuestion,
    YesNoQuestion,
    of_kind,
)
from haltrace.data.jsonl import DataFormatError, load_items, save_items
from haltrace.data.sources import default_fit_data
from haltrace.data.visual_counterfact import load_fit_file, load_visual_counterfact

__all__ = ["KINDS", "CaptionItem", "CaptionPair", "DataFormatError", "EntityQuestion", "ImageError", "Item",
           "PvPItem", "Statement", "VQAQuestion", "YesNoQuestion", "default_fit_data", "load_fit_file",
           "load_items", "load_visual_counterfact", "of_kind", "open_image", "save_items"]
