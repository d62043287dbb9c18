"""Model registry: read a checkpoint's config.json, pick the family by `model_type`, load it.

Every failure a user can cause (a typo in the model id, no network, no GPU, too little memory)
becomes a `ModelLoadError` whose text is one sentence saying what to do.
"""

from __future__ import annotations

import json
import os
import socket
from urllib.parse import urlparse

import torch

from vlui.models.base import Message, PreparedPrompt, VisionChatModel

__all__ = ["FAMILIES", "Message", "ModelLoadError", "PreparedPrompt", "VisionChatModel", "load_model", "read_config"]

DEFAULT_MODEL = "qihoo360/360VL-8B"


class ModelLoadError(RuntimeError):
    """`str(err)` is a complete sentence for the user."""


def _families():
    from vlui.models.llava_hf import LlavaHF
    from vlui.models.qh360vl import QH360VL

    return {"llava": LlavaHF, "QH_360VL": QH360VL}


FAMILIES = ("llava", "QH_360VL")


def read_config(path: str, local_files_only: bool = False) -> dict:
    """config.json of a local directory or a Hugging Face Hub repository."""
    if os.path.isdir(path):
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ModelLoadError(f"'{path}' is a directory without a config.json, so it is not a model checkpoint.")
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelLoadError(f"Model directory '{path}' does not exist.")
    else:
        file = _download_config(path, local_files_only)
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read the model's config.json ({exc}).") from None


def _download_config(repo_id: str, local_files_only: bool) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = ModelLoadError(
        f"Cannot download '{repo_id}': the Hugging Face Hub is unreachable or offline mode is on, and the model "
        f"is not in the local cache. Connect to the internet, or download it elsewhere "
        f"(`hf download {repo_id} --local-dir DIR`) and pass --model DIR."
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelLoadError(f"'{repo_id}' is neither a local directory nor a valid Hugging Face model id.") from None
    try:  # the local cache first: no network needed for a model downloaded before
        return hf_hub_download(repo_id, "config.json", local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if local_files_only or not _hub_reachable():
        raise offline  # at once, instead of minutes of retries
    try:
        return hf_hub_download(repo_id, "config.json")
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: check it first)
        raise ModelLoadError(
            f"Cannot download '{repo_id}': the Hugging Face Hub is unreachable or offline mode is on, and the model "
            f"is not in the local cache. Connect to the internet, or download it elsewhere "
            f"(`hf download {repo_id} --local-dir DIR`) and pass --model DIR."
        ) from None
    except GatedRepoError:
        raise ModelLoadError(
            f"'{repo_id}' is gated: accept its licence on huggingface.co, then log in here with `hf auth login`."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"Model '{repo_id}' was not found on the Hugging Face Hub (check the spelling; private models need "
            "`hf auth login`), and no local directory has that name."
        ) from None
    except EntryNotFoundError:
        raise ModelLoadError(f"'{repo_id}' on the Hugging Face Hub has no config.json, so it is not a model.") from None
    except HFValidationError:
        raise ModelLoadError(f"'{repo_id}' is neither a local directory nor a valid Hugging Face model id.") from None
    except OSError:  # connection failures surface as OSError subclasses
        raise ModelLoadError(
            f"Cannot download '{repo_id}': the Hugging Face Hub is unreachable and the model is not in the local "
            f"cache. Connect to the internet, or download it elsewhere (`hf download {repo_id} --local-dir DIR`) "
            "and pass --model DIR."
        ) from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_device(device: str) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> what transformers' device_map takes."""
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return "auto" if torch.cuda.device_count() > 1 else "cuda:0"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {device} was asked for, but PyTorch sees no CUDA GPU (check `nvidia-smi` and that a CUDA "
                "build of torch is installed), or use --device cpu (slow)."
            )
        return "cuda:0" if device == "cuda" else device
    if device == "cpu":
        return "cpu"
    raise ModelLoadError(f"Unknown --device '{device}': use auto, cuda, cuda:N or cpu.")


def resolve_dtype(dtype: str, device_map: str) -> torch.dtype:
    if dtype == "auto":
        if device_map == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise ModelLoadError(f"Unknown --dtype '{dtype}': use auto, bfloat16, float16 or float32.")
    return table[dtype]


def quantization_config(mode: str | None, dtype: torch.dtype, skip_modules: list[str]):
    if not mode or mode == "none":
        return None
    if mode != "4bit":
        raise ModelLoadError(f"Unknown --quantize '{mode}': use 4bit or none.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("--quantize 4bit needs bitsandbytes and a CUDA GPU: `pip install bitsandbytes`.") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip_modules,
    )


def load_model(
    path: str,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    local_files_only: bool = False,
) -> VisionChatModel:
    config = read_config(path, local_files_only)
    model_type = config.get("model_type")
    families = _families()
    if model_type not in families:
        raise ModelLoadError(
            f"'{path}' is a '{model_type}' model; vlui runs {', '.join(FAMILIES)} checkpoints "
            "(360VL-8B/70B, LLaVA-Llama-3 in Hugging Face format)."
        )
    family = families[model_type]
    device_map = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device_map)
    quant = quantization_config(quantize, torch_dtype, family.quantization_skip_modules)
    if quant is not None and device_map == "cpu":
        raise ModelLoadError("--quantize 4bit needs a CUDA GPU; on the CPU leave it out.")
    try:
        return family.load(
            path, dtype=torch_dtype, device_map=device_map, quantization_config=quant,
            local_files_only=local_files_only,
        )
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(
            f"The GPU does not have enough memory for '{path}' in {str(torch_dtype).removeprefix('torch.')}. "
            "Try --quantize 4bit, --device auto with more GPUs, or a smaller model."
        ) from None
    except OSError as exc:  # missing weight files, unreachable Hub in the middle of a download
        raise ModelLoadError(f"Cannot load the weights of '{path}': {exc}") from None
