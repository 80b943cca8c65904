"""The drift statistics (`ssn_platform.drift`): PSI and the two-test rule on known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from ssn_platform.drift import drift_of, judge, population_stability_index


def test_psi_is_zero_for_the_same_sample_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    reference = rng.beta(2, 8, 2000)
    assert population_stability_index(reference, reference) == pytest.approx(0.0, abs=1e-12)
    small, large = (population_stability_index(reference, np.clip(reference + d, 0, 1)) for d in (0.02, 0.15))
    assert 0.0 < small < 0.1 < 0.25 < large


def test_a_window_is_drifting_only_when_psi_and_ks_agree_and_is_not_judged_when_small():
    rng = np.random.default_rng(1)
    reference = rng.normal(0.2, 0.05, 500)
    assert judge(reference, rng.normal(0.2, 0.05, 200), psi_limit=0.25, ks_alpha=0.01, min_window=30)[0] == "stable"
    assert judge(reference, rng.normal(0.3, 0.05, 200), psi_limit=0.25, ks_alpha=0.01, min_window=30)[0] == "drifting"
    # a big window makes KS significant for a negligible shift; PSI keeps it stable
    status, psi, _, pvalue = judge(
        rng.normal(0.2, 0.05, 50000), rng.normal(0.203, 0.05, 50000), psi_limit=0.25, ks_alpha=0.01, min_window=30
    )
    assert (status, pvalue < 0.01, psi < 0.25) == ("stable", True, True)
    assert judge(reference, reference[:10], psi_limit=0.25, ks_alpha=0.01, min_window=30)[0] == "insufficient"


def test_the_products_listing_reads_the_last_check_from_registered_model_tags():
    assert drift_of({}) is None
    tags = {
        "ssn.drift.status": "drifting",
        "ssn.drift.psi": "0.41",
        "ssn.drift.ks_pvalue": "1e-09",
        "ssn.drift.version": "3",
        "ssn.drift.checked_at": "2026-12-03T10:00:00+00:00",
    }
    assert drift_of(tags) == {
        "status": "drifting",
        "psi": 0.41,
        "ks_pvalue": 1e-9,
        "version": "3",
        "checked_at": "2026-12-03T10:00:00+00:00",
    }
