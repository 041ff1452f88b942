"""results.md names every method it reports: each row name of the tables has a line in the Methods section."""

from __future__ import annotations

from research.report import baseline_factories
from research.report.markdown import METHODS, methods_section


def test_every_reported_method_is_described_with_its_source() -> None:
    described = {name for names, _, _ in METHODS for name in names.split(", ")}
    reported = {"saco", *baseline_factories(num_actions=4, seed=0, known_world=True)}
    assert reported <= described, reported - described
    for names, what, source in METHODS:
        assert len(what) > 40 and source, names
    text = "\n".join(methods_section())
    assert "*SACO: Sequence-Aware Constrained Optimization Framework for Coupon Distribution in E-commerce*" in text
    assert all(f"| {names} |" in text for names, _, _ in METHODS)
