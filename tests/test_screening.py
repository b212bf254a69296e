"""The server's screening: relative deviations read from stored payloads, and the verdicts of
the absolute bound and the pooled median/MAD test (whole runs with attackers are in
test_strategy.py)."""

import math
from pathlib import Path

import pytest
import torch

from pruning.attacks import poison
from pruning.payload import Expected, PayloadMeta, StoredPayload, encode_payload
from pruning.screening import deviations, screen
from pruning.sparsity import keep_topk

KEY = "model.layers.{}.mlp.up_proj.weight"
BASE = {KEY.format(0): torch.randn(16, 32, generator=torch.Generator().manual_seed(0))}


def stored(tmp_path: Path, weights: dict, masks: dict) -> StoredPayload:
    path = tmp_path / "payload.safetensors"
    path.write_bytes(encode_payload(weights, PayloadMeta(1, [0], 0.5), masks))
    return StoredPayload(path)


@pytest.fixture
def honest(tmp_path: Path) -> tuple[bytes, StoredPayload]:
    """Magnitude pruning at 50%, values rounded to bfloat16 on the wire."""
    mask = keep_topk(BASE[KEY.format(0)].abs(), 0.5)
    weights = {KEY.format(0): (BASE[KEY.format(0)] * mask).bfloat16()}
    payload = stored(tmp_path, weights, {KEY.format(0): mask})
    return payload.path.read_bytes(), payload


def test_deviation_is_the_relative_move_on_the_kept_positions(honest, tmp_path: Path):
    blob, payload = honest
    (rounding,) = deviations(payload, BASE.__getitem__).values()
    assert 0 < rounding < 2**-8  # bfloat16 rounding only
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(poison(blob, "sign-flip", BASE))
    (moved,) = deviations(StoredPayload(flipped), BASE.__getitem__).values()
    assert moved == pytest.approx(2.0, abs=0.01)


def test_a_refine_payload_is_judged_on_its_values_in_the_servers_mask(honest, tmp_path: Path):
    _, payload = honest
    masks = {k: payload.update(k)[1] for k in BASE}
    merged = {k: v * masks[k] for k, v in BASE.items()}  # the server's masked layer
    path = tmp_path / "refine.safetensors"
    weights = {k: (1.5 * v).bfloat16() for k, v in merged.items()}
    path.write_bytes(encode_payload(weights, PayloadMeta(1, [0], 0.5, phase="refine"), masks))
    shapes = {k: tuple(v.shape) for k, v in BASE.items()}
    refined = StoredPayload(path, Expected(shapes, masks=masks.get))
    assert deviations(refined, merged.__getitem__)[KEY.format(0)] == pytest.approx(0.5, abs=0.01)


def pool(devs: list[list[float]]) -> dict[int, dict[str, float]]:
    """``{node: {key of layer i: devs[node][i]}}``."""
    return {n: {KEY.format(i): d for i, d in enumerate(row)} for n, row in enumerate(devs)}


def test_a_lone_client_faces_the_absolute_bound_only():
    assert screen(pool([[0.9, 1.1]]), 6.0, 1.25)[0].accepted
    verdict = screen(pool([[0.9, 1.3]]), 6.0, 1.25)[0]
    assert not verdict.accepted and verdict.deviation == 1.3
    assert verdict.reason == f"{KEY.format(1)}: deviation 1.3 > bound 1.25"


def test_one_tensor_that_stands_out_of_its_pool_drops_the_payload():
    honest = [[0.20, 0.22, 0.18, 0.25], [0.21, 0.19, 0.24, 0.2], [0.23, 0.2, 0.19, 0.22]]
    verdicts = screen(pool([*honest, [0.21, 0.2, 0.8, 0.22]]), 6.0, 1.25)
    assert [v.accepted for v in verdicts.values()] == [True, True, True, False]
    assert verdicts[3].reason.startswith(f"{KEY.format(2)}: deviation 0.8 > 0.")
    assert "pool median 0.2" in verdicts[3].reason


def test_the_pool_test_never_cuts_below_half_the_bound():
    """Refine pools mix near-exact re-solves (~0) with real moves; the latter are honest."""
    rows = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6], [0.0, 0.0, 0.0, 0.0]]
    assert all(v.accepted for v in screen(pool(rows), 6.0, 1.25).values())
    assert not screen(pool([*rows, [0.0, 0.7]]), 6.0, 1.25)[3].accepted


@pytest.mark.parametrize("level", [0.0, 0.0017, 0.2])
def test_near_identical_honest_deviations_do_not_trip_the_pool(level: float):
    """The MAD is floored (a quarter of the median, and 0.01): exact copies and rounding noise
    leave room."""
    rows = [[level * (1 + 0.01 * n), level * (1 + 0.4 * (n == 3))] for n in range(4)]
    assert all(v.accepted for v in screen(pool(rows), 6.0, 1.25).values())


def test_an_infinite_deviation_is_an_outlier():
    verdicts = screen(pool([[0.1, 0.1], [0.1, math.inf]]), 6.0, 1.25)
    assert verdicts[0].accepted and not verdicts[1].accepted
