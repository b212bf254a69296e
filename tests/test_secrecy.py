"""What leaves a client: the bytes of a real job's reply (payload metadata and tensors, and its
metrics) in both phases never contain its calibration text or the token ids it calibrated on."""

import json
from pathlib import Path

import numpy as np

from pruning.config import RunConfig
from pruning.federated import ClientData, ClientWorker, GlobalModel, Job
from pruning.payload import decode_payload

WORDS = ["Zorblatt", "Pumblechook", "quixotic", "periwinkle", "florins", "Xylophagous"]


def private_text(path: Path) -> Path:
    rows = [
        f"Ledger {i}: the quixotic Xylophagous Zorblatt paid {1000 + 37 * i} florins to Mrs "
        f"Pumblechook for periwinkle saxophone lessons number {i % 13}."
        for i in range(400)
    ]
    path.write_text("\n".join(rows))
    return path


def needles(text: str, windows: np.ndarray) -> set[bytes]:
    """The text's rows and distinctive words, and every 4 consecutive calibration token ids as
    little-endian int16, int32 and int64."""
    found = {row.encode() for row in text.splitlines()}
    found |= {w.encode() for word in WORDS for w in (word, word.lower(), word.upper())}
    for row in windows:
        for i in range(len(row) - 3):
            found |= {row[i : i + 4].astype(f"<i{size}").tobytes() for size in (2, 4, 8)}
    return found


def test_no_calibration_text_or_token_ids_leave_a_client(tiny_llama_dir: Path, tmp_path: Path):
    data = ClientData(path=str(private_text(tmp_path / "private.txt")))
    worker = ClientWorker(str(tiny_llama_dir))
    cfg = RunConfig(model=str(tiny_llama_dir), nsamples=4, seqlen=32)
    prune = Job.plan(cfg, 1, [1, 2])
    blob, metrics = worker.run(prune, data)
    # the refine job builds on the server's merged layers: here this client's own, sent back
    server = GlobalModel(cfg.model)
    for key, weight in decode_payload(blob).weights.items():
        server.write(key, weight)
    down = server.encode([0, 1, 2], 2, cfg.sparsity, cfg.pattern, cfg.transport_dtype)
    refined, refine_metrics = worker.run(Job.plan(cfg, 2, [1, 2], phase="refine"), data, down)

    windows = data.calibration(worker.tokenizer, prune).numpy()
    secrets = needles(Path(data.path).read_text(), windows)
    leak = windows[0, 5:9].astype("<i2").tobytes()
    assert [s for s in secrets if s in blob + leak], "the scan must see ids that do leak"
    for sent in (blob, refined, json.dumps([metrics, refine_metrics]).encode()):
        assert not [s for s in secrets if s in sent]
