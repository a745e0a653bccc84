"""``load``: a hub id, local folder or organism name -> :class:`~haltrace.models.base.Model`.

>>> model = load("shapes-llava")                                            # doctest: +SKIP
>>> model = load("llava-hf/llava-1.5-7b-hf", dtype="bfloat16", attn_implementation="eager")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from haltrace.models.base import Model


def _resolve_name(name_or_path: str) -> str:
    # organism short names ("shapes-llava") map to a folder; anything else is a hub id or path
    from haltrace.organism.paths import resolve_organism

    folder = resolve_organism(str(name_or_path))
    return str(folder) if folder is not None else str(name_or_path)


def _dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return value


def is_vlm_config(config: Any) -> bool:
    """True when ``config`` describes an image-text-to-text model (it has a vision sub-config)."""
    return getattr(config, "vision_config", None) is not None


def load(name_or_path: str, *, device: str | torch.device | None = None, dtype: Any = None,
         attn_implementation: str | None = None, remote: bool = False, **hf_kwargs: Any) -> Model:
    """Load a model and its processor (VLM) or tokenizer (LLM), in eval mode.

    ``device`` defaults to CUDA when available, else CPU; with ``device_map=`` (in ``hf_kwargs``) accelerate
    places the model and ``device`` is ignored. ``dtype`` is a torch dtype or its name. ``remote`` is only
    recorded (``model.remote``) for the nnsight backend. Other keyword arguments (``revision``,
    ``trust_remote_code``, ``device_map`` ...) go to ``from_pretrained``.

    >>> model = load("gpt2", dtype="float32")  # doctest: +SKIP
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    path = _resolve_name(name_or_path)
    shared = {k: hf_kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir") if k in hf_kwargs}
    config = AutoConfig.from_pretrained(path, **shared)
    vlm = is_vlm_config(config)
    kwargs = dict(hf_kwargs)
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    hf_model = auto.from_pretrained(path, **kwargs)
    if "device_map" not in hf_kwargs:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_model = hf_model.to(device)
    hf_model.eval()
    if vlm:
        try:
            processor = AutoProcessor.from_pretrained(path, **shared)
        except (ImportError, ValueError, OSError, AttributeError, TypeError) as err:
            # e.g. Qwen-VL processors need torchvision for their video part; text still works
            warnings.warn(f"could not build the processor for {name_or_path} ({err}); falling back to the "
                          "tokenizer, so Model.prepare cannot take images", stacklevel=2)
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(path, **shared)
        else:
            tokenizer = getattr(processor, "tokenizer", processor)
    else:
        processor = None
        tokenizer = AutoTokenizer.from_pretrained(path, **shared)
    return Model(hf_model, processor, tokenizer, name_or_path=str(name_or_path),
                 revision=hf_kwargs.get("revision"), remote=remote)
