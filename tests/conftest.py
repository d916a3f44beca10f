"""Shared fixtures: golden files, tiny configs, output folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def golden_dir() -> Path:
    return GOLDEN


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test leaves a screenshot and the page's visible text in test-output/."""
    outcome = yield
    report = outcome.get_result()
    page = getattr(item, "funcargs", {}).get("page")
    if report.when != "call" or not report.failed or page is None:
        return
    out = Path(__file__).resolve().parent.parent / "test-output" / "browser-failures"
    try:
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{item.name}.png"), full_page=True)
        (out / f"{item.name}.txt").write_text(page.inner_text("body"))
    except Exception as exc:  # the page may be gone; the failure itself is what matters
        print(f"could not save the failing page: {exc}")
