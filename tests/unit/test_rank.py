"""The rank advisor: spectral tails against svdvals by hand, r* against its formula, hooked
hidden states against transformers' output_hidden_states, the report and ``lrkd rank``."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama

from lrkd.cli import main
from lrkd.diagnostics.rank import (
    DEFAULT_C,
    RankReport,
    default_widths,
    rank_report,
    round_to_heads,
    spectral_tail,
    suggested_rank,
    teacher_hidden_states,
)


def _tail_by_hand(x: torch.Tensor, r: int) -> float:
    energy = torch.linalg.svdvals(x.double()).pow(2)
    return (energy[r:].sum() / energy.sum()).item()


def test_spectral_tail_of_a_rank_k_matrix_vanishes_from_k_on() -> None:
    torch.manual_seed(0)
    k = 5
    x = torch.randn(200, k, dtype=torch.float64) @ torch.randn(k, 16, dtype=torch.float64)
    tails = spectral_tail(x, list(range(20)), center=False)
    assert tails.dtype == torch.float64 and tails.shape == (20,)
    assert tails[0] == 1.0
    assert (tails[1:k] > 1e-3).all()
    assert tails[k:].abs().max() < 1e-10
    assert (tails[16:] == 0).all()


def test_spectral_tail_matches_svdvals_by_hand() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 40, 24)  # leading dims are flattened to 120 rows
    ranks = [0, 1, 3, 8, 23, 24, 100]
    expected = [_tail_by_hand(x.reshape(-1, 24), r) for r in ranks]
    torch.testing.assert_close(
        spectral_tail(x, ranks, center=False), torch.tensor(expected, dtype=torch.float64)
    )
    assert (spectral_tail(x, ranks, center=False).diff() <= 0).all()


def test_spectral_tail_centres_columns() -> None:
    torch.manual_seed(2)
    x = torch.randn(100, 12, dtype=torch.float64)
    offset = 1e3 * torch.arange(1, 13, dtype=torch.float64)
    ranks = [0, 1, 2, 6, 11]
    centred = x - x.mean(0)
    expected = torch.tensor([_tail_by_hand(centred, r) for r in ranks], dtype=torch.float64)
    torch.testing.assert_close(spectral_tail(x + offset, ranks), expected)
    # Uncentred, the offset is one dominant direction.
    assert spectral_tail(x + offset, [1], center=False).item() < 1e-4


def test_spectral_tail_edge_cases() -> None:
    assert (spectral_tail(torch.zeros(10, 4), [0, 2]) == 0).all()
    with pytest.raises(ValueError, match="non-negative"):
        spectral_tail(torch.randn(10, 4), [-1])


def test_suggested_rank_is_c_sqrt_n() -> None:
    assert suggested_rank(1e8) == pytest.approx(DEFAULT_C * 1e4)
    assert suggested_rank(2e10) == pytest.approx(0.01 * math.sqrt(2e10))
    assert suggested_rank(400.0, c=0.5) == pytest.approx(10.0)
    for bad in ({"num_tokens": 0}, {"num_tokens": -5.0}, {"num_tokens": 1e6, "c": 0.0}):
        with pytest.raises(ValueError, match="positive"):
            suggested_rank(**bad)


@pytest.mark.parametrize(
    ("width", "heads", "max_width", "expected"),
    [
        (100.0, 9, 576, 99),  # 11.1 heads -> 11
        (104.0, 9, 576, 108),  # 11.6 heads -> 12
        (13.5, 9, 576, 18),  # exactly 1.5 heads: halves round up
        (0.3, 9, 576, 9),  # clamped up to one head
        (1e6, 9, 576, 576),  # clamped down to the teacher width
        (70.0, 4, 66, 64),  # a max_width that is not a multiple rounds down to one
        (64.0, 4, 64, 64),
    ],
)
def test_round_to_heads(width, heads, max_width, expected) -> None:
    assert round_to_heads(width, heads, max_width) == expected


def test_round_to_heads_errors() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        round_to_heads(10.0, 0, 64)
    with pytest.raises(ValueError, match="max_width"):
        round_to_heads(10.0, 8, 4)


def test_default_widths() -> None:
    assert default_widths(576, 9) == [72, 144, 216, 288, 432, 576]
    assert default_widths(64, 4) == [8, 16, 24, 32, 48, 64]


def test_teacher_hidden_states_match_transformers_under_padding() -> None:
    model = make_tiny_llama(seed=0, num_hidden_layers=3)
    torch.manual_seed(0)
    ids = torch.randint(4, 128, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    ids[mask == 0] = 3
    states = teacher_hidden_states(model, ids, mask)
    assert len(states) == 3
    assert all(h.shape == (int(mask.sum()), 64) and h.dtype == torch.float32 for h in states)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # transformers: [embeddings, layer 1, ..., layer L-1, final_norm(layer L)]
    assert len(reference.hidden_states) == 4
    keep = mask.bool()
    for h, ref in zip(states[:-1], reference.hidden_states[1:-1], strict=True):
        torch.testing.assert_close(h, ref[keep])
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(states[-1]), reference.hidden_states[-1][keep])
    unmasked = teacher_hidden_states(model, ids)
    assert unmasked[0].shape == (ids.numel(), 64)


def test_rank_report_on_a_tiny_teacher() -> None:
    model = make_tiny_llama(seed=0)
    torch.manual_seed(0)
    probe = torch.randint(4, 128, (4, 64))
    report = rank_report(model, num_tokens=3e5, c=0.01, probe_input_ids=probe)
    assert isinstance(report, RankReport)
    assert report.suggested == pytest.approx(0.01 * math.sqrt(3e5))  # 5.48
    assert report.suggested_width == 4
    assert (report.teacher_width, report.num_heads, report.probe_tokens) == (64, 4, 256)
    widths = [row.width for row in report.rows]
    assert widths == [4, 8, 16, 24, 32, 48, 64]
    for row in report.rows:
        assert 0 <= row.tail_final <= row.tail_max <= 1
        assert 0 <= row.tail_mean <= row.tail_max
        assert row.tokens_for_width == pytest.approx((row.width / 0.01) ** 2)
    assert report.rows[-1].tail_max < 1e-12
    for key in ("tail_mean", "tail_final", "tail_max"):
        values = [getattr(row, key) for row in report.rows]
        assert values == sorted(values, reverse=True)
    hidden = teacher_hidden_states(model, probe)
    assert report.rows[2].tail_final == pytest.approx(spectral_tail(hidden[-1], [16]).item())

    table = report.table()
    assert "r* = c*sqrt(n) = 0.01 * sqrt(3e+05) = 5.5, rounded to 4" in table
    assert "| width | tail mean | tail final | tail max | tokens for width |" in table
    assert "| 4 (r*) |" in table
    rows = [line for line in table.splitlines() if line[:3] in {f"| {d}" for d in range(10)}]
    assert len(rows) == len(widths)


def test_rank_report_errors() -> None:
    model = make_tiny_llama(seed=0)
    probe = torch.randint(4, 128, (1, 16))
    with pytest.raises(ValueError, match=r"outside \[1, 64\]"):
        rank_report(model, 1e6, widths=[16, 65], probe_input_ids=probe)
    with pytest.raises(ValueError, match=r"outside \[1, 64\]"):
        rank_report(model, 1e6, widths=[0], probe_input_ids=probe)
    with pytest.raises(ValueError, match="num_tokens"):
        rank_report(model, 0, probe_input_ids=probe)
    with pytest.raises(ValueError, match="c="):
        rank_report(model, 1e6, c=-1.0, probe_input_ids=probe)
    with pytest.raises(ValueError, match=r"tokenizer.*Give probe_input_ids"):
        rank_report(model, 1e6)  # built from a config: no name_or_path, no tokenizer


def test_rank_report_probes_with_the_teachers_tokenizer(tiny_teacher_dir) -> None:
    from lrkd.data.probe import probe_batch
    from lrkd.models.teachers import load_teacher, load_tokenizer

    teacher = load_teacher(str(tiny_teacher_dir))
    report = rank_report(teacher, 1e6, widths=[16], probe_tokens=512)
    probe = probe_batch(load_tokenizer(str(tiny_teacher_dir)), n_tokens=512)
    given = rank_report(teacher, 1e6, widths=[16], probe_input_ids=probe)
    assert report == given


def test_lrkd_rank_prints_the_table(tiny_teacher_dir, capsys) -> None:
    report = main(
        [
            "rank",
            "--teacher",
            str(tiny_teacher_dir),
            "--num_tokens",
            "1e6",
            "--widths",
            "[16, 32]",
            "--probe_tokens",
            "512",
        ]
    )
    out = capsys.readouterr().out
    assert isinstance(report, RankReport)
    assert [row.width for row in report.rows] == [12, 16, 32]  # r* = 10 = 2.5 heads -> 12
    assert report.probe_tokens == 512
    assert "r* = c*sqrt(n) = 0.01 * sqrt(1e+06) = 10.0, rounded to 12" in out
    assert "| 12 (r*) |" in out and "| 16 |" in out and "| 32 |" in out
