"""The sequential layer driver on tiny random LLaMA and OPT models."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning.data import get_calibration
from pruning.driver import PruneConfig, PruneReport, prune_layers
from pruning.models import get_adapter, linear_groups, load_model, prunable_shapes
from pruning.pruners import METHODS, SparseGPTPruner
from pruning.sparsity import SparsityError, Target, nm_valid, parse_pattern, prune_count

pytestmark = pytest.mark.usefixtures("one_thread")

CHOSEN = (1, 3)  # layer 0 before, layer 2 between: both only propagated
TARGETS = ["0.5", "0.7", "2:4", "4:8"]
NSAMPLES, SEQLEN = 8, 32


@dataclass
class Run:
    pruned: dict[str, torch.Tensor]  # the whole state dict after pruning
    report: PruneReport


def config(method: str, target: str, **kw) -> PruneConfig:
    """``target`` is a sparsity (``"0.7"``) or an N:M pattern (``"2:4"``)."""
    pattern = parse_pattern(target) if ":" in target else None
    sparsity = pattern.sparsity if pattern else float(target)
    return PruneConfig(method, sparsity, str(pattern) if pattern else None, batch_size=3, **kw)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 64 kB slice of WikiText-2: real text, but quick to tokenize."""
    text = (data_dir / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("calib") / "wiki-slice.txt"
    path.write_text(text[:65_536], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, calib_file: Path):
    """The dense tiny model (copied by every test) and its calibration windows."""
    model, tokenizer = load_model(str(tiny_model_dir))
    calib = get_calibration(str(calib_file), tokenizer, NSAMPLES, SEQLEN, seed=0)
    return model, tokenizer, calib


@pytest.fixture(scope="module")
def runs(tiny):
    """Memoised driver runs on a copy of the dense model, pruning the ``CHOSEN`` layers."""
    model, _, calib = tiny
    cache: dict[tuple, Run] = {}

    def run(method: str, target: str, true_sequential: bool = False) -> Run:
        key = (method, target, true_sequential)
        if key not in cache:
            pruned = copy.deepcopy(model)
            cfg = config(method, target, true_sequential=true_sequential)
            report = prune_layers(pruned, calib, CHOSEN, cfg, device="cpu", progress=False)
            cache[key] = Run(state(pruned), report)
        return cache[key]

    return run


def prunable_keys(model: torch.nn.Module, layers) -> set[str]:
    shapes = prunable_shapes(model)
    return {k for i in layers for k in shapes[i]}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", METHODS)
def test_exact_sparsity_and_nothing_else_changes(tiny, runs, method: str, target: str) -> None:
    run = runs(method, target)
    chosen = prunable_keys(tiny[0], CHOSEN)
    assert len(chosen) == {"llama": 7, "opt": 6}[get_adapter(tiny[0]).family] * len(CHOSEN)
    pattern = parse_pattern(target) if ":" in target else None
    for key, dense in tiny[0].state_dict().items():
        weight = run.pruned[key]
        if key not in chosen:
            assert torch.equal(weight, dense), f"{key} changed but its layer was not chosen"
            continue
        mask = run.report.masks()[key]
        assert torch.equal(weight == 0, ~mask), key
        if pattern:
            assert nm_valid(mask, pattern), key
            assert int(mask.sum()) == mask.numel() * pattern.n // pattern.m, key
        else:
            assert int((~mask).sum()) == prune_count(mask.numel(), float(target)), key
    assert set(run.report.masks()) == chosen


@pytest.mark.parametrize("target", ["0.5", "2:4"])
def test_sparsegpt_has_the_lowest_layer_error(runs, target: str) -> None:
    errors = {
        m: {i: r.rel_error for i, r in runs(m, target).report.layers.items()} for m in METHODS
    }
    for i in CHOSEN:
        assert 0 < errors["sparsegpt"][i] < min(errors["wanda"][i], errors["magnitude"][i]), errors


def test_report(tiny, runs) -> None:
    model = tiny[0]
    prefix = get_adapter(model).prefix
    report = runs("wanda", "0.7").report
    assert sorted(report.layers) == list(CHOSEN)
    assert report.tokens == NSAMPLES * SEQLEN and report.seconds > 0
    for i, layer in report.layers.items():
        assert layer.index == i and layer.seconds > 0
        assert {f"{prefix(i)}{name}" for name in layer.sparsity} == set(layer.masks)
        for name, fraction in layer.sparsity.items():
            numel = model.get_parameter(f"{prefix(i)}{name}").numel()
            assert fraction == pytest.approx(prune_count(numel, 0.7) / numel)


@pytest.mark.parametrize("method", METHODS)
def test_true_sequential(tiny, runs, method: str) -> None:
    """The first group sees the same input either way; later groups see pruned outputs."""
    seq, joint = runs(method, "0.7", true_sequential=True), runs(method, "0.7")
    model = tiny[0]
    adapter = get_adapter(model)
    groups = linear_groups(adapter.layers(model)[CHOSEN[0]], adapter, true_sequential=True)
    first_key = f"{adapter.prefix(CHOSEN[0])}{groups[0][0].name}"
    last_key = f"{adapter.prefix(CHOSEN[0])}{groups[-1][0].name}"
    assert len(groups) == 4
    for key, mask in seq.report.masks().items():
        assert int((~mask).sum()) == prune_count(mask.numel(), 0.7), key
    assert torch.equal(seq.pruned[first_key], joint.pruned[first_key])
    assert torch.equal(seq.pruned[last_key], joint.pruned[last_key]) == (method == "magnitude")


def test_same_seed_same_masks(tiny, calib_file: Path) -> None:
    """Calibration sampling and pruning are pure functions of the seed."""
    model, tokenizer, _ = tiny

    def once(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        calib = get_calibration(str(calib_file), tokenizer, NSAMPLES, SEQLEN, seed=seed)
        pruned = copy.deepcopy(model)
        report = prune_layers(pruned, calib, CHOSEN, config("sparsegpt", "0.5"), "cpu", False)
        return calib, report.masks(), state(pruned)

    (calib_a, masks_a, state_a), (calib_b, masks_b, state_b) = once(0), once(0)
    assert torch.equal(calib_a, calib_b)
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    calib_c, masks_c, _ = once(1)
    assert not torch.equal(calib_a, calib_c)
    assert any(not torch.equal(masks_a[k], masks_c[k]) for k in masks_a)


def test_pruning_in_two_calls_equals_one(tiny) -> None:
    """Later layers are calibrated on the outputs of the already pruned earlier layers."""
    model, _, calib = tiny
    cfg = config("sparsegpt", "0.5")
    joint, split = copy.deepcopy(model), copy.deepcopy(model)
    prune_layers(joint, calib, [0, 1], cfg, "cpu", False)
    prune_layers(split, calib, [0], cfg, "cpu", False)
    prune_layers(split, calib, [1], cfg, "cpu", False)
    joint_state, split_state = joint.state_dict(), split.state_dict()
    assert all(torch.equal(joint_state[k], split_state[k]) for k in joint_state)


def test_refinement_solves_from_start_on_one_pass_through_the_loaded_layers(tiny, runs) -> None:
    """``start``: each chosen layer runs once as loaded (a merged sparse layer); its linears are
    re-solved from the dense weights for their fixed masks on the inputs they saw in that pass,
    which a brute-force reference records with hooks on the whole merged model."""
    model, _, calib = tiny
    merged_state, masks = runs("sparsegpt", "0.5").pruned, runs("sparsegpt", "0.5").report.masks()
    dense = state(model)
    merged = copy.deepcopy(model)
    merged.load_state_dict(merged_state)
    adapter = get_adapter(merged)
    layers = adapter.layers(merged)
    calls = [0] * len(layers)
    inputs: dict[str, list[torch.Tensor]] = {k: [] for k in masks}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    for key in masks:
        merged.get_submodule(key.removesuffix(".weight")).register_forward_hook(
            lambda _m, args, _o, key=key: inputs[key].append(args[0])
        )
    cfg = config("sparsegpt", "0.5")
    targets = {k: Target.fixed(m) for k, m in masks.items()}
    report = prune_layers(
        merged, calib, CHOSEN, cfg, "cpu", False, targets.__getitem__, dense.__getitem__
    )
    batches = -(-NSAMPLES // cfg.batch_size)
    assert calls[: CHOSEN[-1] + 1] == [batches] * (CHOSEN[-1] + 1)  # one pass, no re-run
    assert set(report.masks()) == set(masks)
    refined = state(merged)
    for key, value in refined.items():
        if key not in masks:
            assert torch.equal(value, merged_state[key]), f"{key} is not a refined weight"
            continue
        assert torch.equal(report.masks()[key], masks[key]) and torch.equal(value != 0, masks[key])
        ref = SparseGPTPruner(value.shape[1], torch.device("cpu"))
        for x in inputs[key]:
            ref.add_batch(x)
        expected = ref.prune(dense[key], Target.fixed(masks[key])).weight
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # the attention output sees the merged (pruned) q/k/v here, not the dense ones it was pruned on
    assert any(not torch.equal(refined[k], merged_state[k]) for k in masks)
    assert all(r.rel_error is None for r in report.layers.values())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_short_last_batch(tiny_model_dir: Path, tiny, attn: str) -> None:
    """10 windows in batches of 4: the last batch is shorter than the attention mask captured
    from the first (eager attention materialises a ``[B, 1, L, L]`` mask)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    calib = torch.cat([tiny[2], tiny[2][:2]])
    cfg = config("wanda", "0.5")
    cfg.batch_size = 4
    report = prune_layers(copy.deepcopy(model), calib, [0, 1], cfg, "cpu", False)
    cfg.batch_size = len(calib)
    single = prune_layers(copy.deepcopy(model), calib, [0, 1], cfg, "cpu", False)
    for i in (0, 1):
        assert report.layers[i].rel_error == pytest.approx(single.layers[i].rel_error, rel=1e-3)


def test_no_layers_is_a_no_op(tiny) -> None:
    model, _, calib = tiny
    pruned = copy.deepcopy(model)
    report = prune_layers(pruned, calib, [], config("sparsegpt", "0.5"), "cpu", False)
    assert report.layers == {} and report.masks() == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pruned.state_dict().items())


@pytest.mark.parametrize(
    ("layers", "cfg", "error"),
    [
        ([4], config("wanda", "0.5"), ValueError),
        ([-1, 2], config("wanda", "0.5"), ValueError),
        ([0], PruneConfig("wanda", 0.7, "2:4"), SparsityError),
        ([0], PruneConfig("wanda", 1.0), SparsityError),
        ([0], PruneConfig("obs", 0.5), ValueError),
    ],
)
def test_rejects(tiny, layers: list[int], cfg: PruneConfig, error: type) -> None:
    model, _, calib = tiny
    with pytest.raises(error):
        prune_layers(copy.deepcopy(model), calib, layers, cfg, "cpu", False)
