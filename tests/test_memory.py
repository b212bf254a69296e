"""The server and client hold one copy of the model: freed matrices go back to the system, the
saved model and its sparse copy are written without a second copy, masks are kept packed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pruning.federated
from pruning.federated import GlobalModel
from pruning.payload import decode_payload

ROOT = Path(__file__).resolve().parents[1]

# frees 64 matrices of 8 MiB that sit between small live allocations (a layer's temporaries
# between the tensors a job keeps), after one freed 16 MiB matrix raised glibc's threshold
_FRAGMENT = """
import sys
import torch
from pruning.memory import return_freed_memory
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
if sys.argv[1] == "1":
    assert return_freed_memory()
t = torch.empty(16 << 20, dtype=torch.uint8); del t
before, keep = rss(), []
for _ in range(64):
    keep += [torch.ones(16, dtype=torch.uint8), torch.ones(8 << 20, dtype=torch.uint8)]
for i in range(1, len(keep), 2):
    keep[i] = None
print((rss() - before) // 1024)
"""


def _retained_mib(fixed: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENT, str(int(fixed))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_freed_matrices_are_returned_to_the_system():
    control = _retained_mib(False)
    if control < 256:
        pytest.skip(f"this C library returns freed memory by itself (kept {control} MiB)")
    assert _retained_mib(True) < 64  # of the 512 MiB freed


def test_save_writes_sharded_safetensors_and_a_streamed_sparse_copy(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = GlobalModel(str(tiny_llama_dir))
    for key, weight in model.params.items():  # a pruned-looking model: every other weight zero
        model.write(key, weight * (torch.arange(weight.numel()).view_as(weight) % 2 == 0))
    monkeypatch.setattr(pruning.federated, "SHARD_SIZE", "100KB")
    layers = list(range(model.num_layers))
    saved = model.save(tmp_path, layers, 0.5, "")
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "model").named_parameters())
    for name, param in model.model.named_parameters():
        assert torch.equal(loaded[name], param), name
    sparse = (tmp_path / "model.sparse.safetensors").read_bytes()
    assert saved["sparse_bytes"] == len(sparse)
    assert sparse == model.encode(layers, 0, 0.5, "")  # streamed file == in-memory payload
    decoded = decode_payload(sparse)
    assert all(torch.equal(decoded.weights[k], model.params[k]) for k in model.params)
