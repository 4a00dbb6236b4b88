"""Load a causal LM once: Hugging Face id or local folder, dtype, device, bitsandbytes quantization,
wrapped with nnsight for interactive tracing.

`quantization="auto"` quantizes only when the bf16 weights would not fit the memory budget. The
weights' size is computed from the config alone, by building the model on the `meta` device
(no memory, no download beyond `config.json`): parameters x 2 bytes for bf16, x ~1 for int8
and x ~0.5 for nf4 (plus the embeddings and norms that stay in 16 bits). The budget is, unless
given, 85% of the device's free memory (CUDA: `torch.cuda.mem_get_info`; CPU: available RAM),
which leaves room for activations.
"""

import dataclasses
import logging
import os
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from actors.arch import ArchMap, arch_map
from orchestrator.local_models import local_problem

logger = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "nf4", "auto"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4", "auto")
BUDGET_FRACTION = 0.85
_BYTES_PER_PARAM = {"none": 2.0, "int8": 1.0, "nf4": 0.5}


@dataclasses.dataclass
class LoadedModel:
    """A model ready for patching and scoring.

    Attributes:
        name: the id or path as given (the `model` column of results).
        model: the Hugging Face module, in eval mode.
        tokenizer: its tokenizer.
        arch: where the patching sites are.
        device: where inputs go.
        quantization: what was applied (`none`, `int8`, `nf4`), after resolving `auto`.
        weight_bytes: the loaded weights' footprint.
    """

    name: str
    model: Any
    tokenizer: Any
    arch: ArchMap
    device: torch.device
    quantization: str
    weight_bytes: int
    _nnsight: Any = None

    @property
    def lm(self) -> Any:
        """The model wrapped as `nnsight.TransformersModel`, for tracing in notebooks."""
        if self._nnsight is None:
            from nnsight import TransformersModel

            self._nnsight = TransformersModel(self.model, tokenizer=self.tokenizer)
        return self._nnsight


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device where there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but CUDA is not available here; use device: auto or cpu"
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on CPU (where bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16")
    return getattr(torch, dtype)


def memory_budget(device: torch.device) -> int:
    """Bytes the weights may take on `device`: a fraction of its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * BUDGET_FRACTION)


def count_parameters(config: Any) -> int:
    """Parameters of the model a config describes, counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def choose_quantization(n_params: int, budget_bytes: int) -> str:
    """`none` if bf16 weights fit the budget, else `int8` if that fits, else `nf4`.

    Raises:
        ValueError: not even nf4 fits; the message gives the sizes.
    """
    for quant in ("none", "int8", "nf4"):
        if n_params * _BYTES_PER_PARAM[quant] <= budget_bytes:
            return quant
    need = n_params * _BYTES_PER_PARAM["nf4"] / 2**30
    raise ValueError(
        f"{n_params / 1e9:.1f}B parameters need ~{need:.1f} GiB even in nf4, over the budget of "
        f"{budget_bytes / 2**30:.1f} GiB; give the actor more GPU memory (resources) or use a "
        "smaller model"
    )


def _not_found(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"model {name!r}: not a local directory with a config.json, and it could not be loaded "
        f"from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0]}). Fix: "
        "give the path of a saved model folder, or a hub id that is cached or reachable "
        "(HF_HOME, HF_HUB_OFFLINE)"
    )


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantization: str = "none",
    budget_bytes: int | None = None,
) -> LoadedModel:
    """Load `name` (hub id or folder) for patching and scoring.

    Args:
        name: Hugging Face hub id or local directory.
        dtype: `auto`, `float32`, `bfloat16` or `float16` for the unquantized parts.
        device: `auto`, `cpu`, `cuda`, `cuda:N`.
        quantization: `none`, `int8`, `nf4`, or `auto` (quantize only if bf16 does not fit).
        budget_bytes: memory the weights may use (default: see `memory_budget`).

    Returns:
        The loaded model with its tokenizer and architecture map.

    Raises:
        ValueError: a missing model, a model that is not a causal LM, an unmappable architecture,
            or an unknown option; each message says what to change.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {list(QUANTIZATIONS)}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    problem = local_problem(name)
    if problem is not None:
        raise ValueError(f"model {name!r}: {problem}; give the folder that save_pretrained wrote")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from err
    if quantization == "auto":
        budget = budget_bytes if budget_bytes is not None else memory_budget(dev)
        quantization = choose_quantization(count_parameters(config), budget)
        logger.info(
            "%s: quantization auto -> %s (budget %.2f GiB)", name, quantization, budget / 2**30
        )
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization == "int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
            )
        )
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(
                f"model {name!r} (model_type={config.model_type!r}) is not a causal language "
                "model; patching and scoring need a decoder with an LM head (AutoModelForCausalLM)"
            ) from err
        raise
    if quantization == "none":
        model = model.to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        arch=arch_map(model),
        device=dev,
        quantization=quantization,
        weight_bytes=model.get_memory_footprint(),
    )
