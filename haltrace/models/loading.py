"""``load``: a hub id, local folder or organism name -> :class:`~haltrace.models.base.Model`.

>>> model = load("shapes-llava")                                            # doctest: +SKIP
>>> model = load("llava-hf/llava-1.5-7b-hf", dtype="bfloat16", attn_implementation="eager")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from haltrace.errors import ModelLoadError
from haltrace.models.base import Model

MODEL_FORMS = "an organism name (shapes-llava), a hub id (org/name) or a local model folder"


def _looks_local(name: str) -> bool:
    """A name only a local path can have: hub ids are ``name`` or ``org/name``."""
    return (name.startswith((".", "~", "/", "\\")) or name.endswith(("/", "\\")) or name.count("/") > 1
            or "\\" in name or Path(name).suffix in (".safetensors", ".bin", ".json", ".gguf"))


def _check_path(name: str, path: str) -> None:
    """Refuse a missing or non-model local path before Hugging Face turns it into a hub-id error."""
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModelLoadError(f"--model {name}: {folder} is a file; give the model's folder (with config.json), "
                                 f"{MODEL_FORMS}")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"--model {name}: {folder} has no config.json, so it is not a Hugging Face model "
                                 "folder (save one with save_pretrained, or train an organism with "
                                 "`haltrace organism train`)")
    elif _looks_local(name):
        raise ModelLoadError(f"--model {name}: no such folder {folder}; give {MODEL_FORMS}")


def _readable(path: str, what: str, call: Any) -> Any:
    """``call()``, with a corrupt weights or config file of a local model named instead of a library trace."""
    try:
        return call()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"cannot read the {what} of {path}: a JSON file there is invalid or not UTF-8 "
                             f"({err}); restore it (re-download or save_pretrained again)") from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        files = sorted(p.name for p in Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
        raise ModelLoadError(f"cannot read the weights of {path} ({', '.join(files) or 'safetensors'}): {err}. "
                             "The file is truncated or not safetensors (a pickle is never loaded); "
                             "re-download it or save the model again") from None


def _resolve_name(name_or_path: str) -> str:
    # organism short names ("shapes-llava") map to a folder; anything else is a hub id or path
    from haltrace.models.shipped import resolve_organism

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

    ``device`` defaults to CUDA when available (``cuda:$LOCAL_RANK`` under torchrun), else CPU; with ``device_map=`` (in ``hf_kwargs``) accelerate
    places the model and ``device`` is ignored. ``dtype`` is a torch dtype or its name. Other keyword arguments
    (``revision``, ``trust_remote_code``, ``device_map`` ...) go to ``from_pretrained``.

    ``remote=True`` (or an NDIF host URL) reads no weight file: the module tree is built from the config on
    the ``meta`` device (hook names, adapters and the nnsight envoys need nothing more) and the processor or
    tokenizer is loaded as usual. ``capture``, ``harvest``, the logit lens and attention-to-image then run
    their forwards on NDIF through nnsight and bring back only the selected rows; anything that needs the
    weights here (steering, method fits, generation) refuses such a model (:func:`require_local_weights`).
    ``remote="local"`` loads the weights and runs nnsight's remote path in-process (a dry run).

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
    _check_path(str(name_or_path), path)
    shared = {k: hf_kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir") if k in hf_kwargs}
    config = _readable(path, "config", lambda: AutoConfig.from_pretrained(path, **shared))
    vlm = is_vlm_config(config)
    kwargs = dict(hf_kwargs)
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    meta = remote is True or (isinstance(remote, str) and remote != "local")
    if meta:  # NDIF holds the weights: the module tree from the config, on the meta device, no weight file read
        build = {k: kwargs[k] for k in ("dtype", "attn_implementation", "trust_remote_code") if k in kwargs}
        with torch.device("meta"):
            hf_model = auto.from_config(config, **build)
    else:
        hf_model = _readable(path, "weights", lambda: auto.from_pretrained(path, **kwargs))
    if "device_map" not in hf_kwargs and not meta:
        if device is None:  # under torchrun / accelerate launch each rank takes its own GPU (LOCAL_RANK)
            local = os.environ.get("LOCAL_RANK")
            device = ("cpu" if not torch.cuda.is_available()
                      else f"cuda:{int(local) % torch.cuda.device_count()}" if local and local.isdigit() else "cuda")
        hf_model = hf_model.to(device)
    hf_model.eval()
    if vlm:
        try:
            processor = AutoProcessor.from_pretrained(path, **shared)
        except (ImportError, ValueError, OSError, AttributeError, TypeError) as err:
            processor = None
            if getattr(config, "model_type", None) in ("qwen2_vl", "qwen2_5_vl"):
                # Qwen-VL processors need torchvision for their video half; images need only the image
                # processor and the tokenizer, which the images-only stand-in combines
                from haltrace.models.qwen_images import load_images_processor

                try:
                    processor = load_images_processor(path, **shared)
                except (ImportError, ValueError, OSError, AttributeError, TypeError):
                    processor = None
            if processor is None:
                warnings.warn(f"could not build the processor for {name_or_path} ({err}); falling back to the "
                              "tokenizer, so Model.prepare cannot take images", stacklevel=2)
                tokenizer = AutoTokenizer.from_pretrained(path, **shared)
            else:
                tokenizer = processor.tokenizer
        else:
            tokenizer = getattr(processor, "tokenizer", processor)
    else:
        processor = None
        tokenizer = AutoTokenizer.from_pretrained(path, **shared)
    return Model(hf_model, processor, tokenizer, name_or_path=str(name_or_path),
                 revision=hf_kwargs.get("revision"), remote=remote)
