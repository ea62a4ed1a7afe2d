"""``protocol.privacy``: the release-gate rule the server and the phone share (ADR 0014).

Table-driven: each case is a policy, what a release spent, and the one-line verdict
(``None``: within the policy). The manifest round trip keeps the spend by unit, and
the signed block (decimal strings: TUF canonical JSON has no floats) parses back to it.
"""

from __future__ import annotations

import pytest

from delta_packager import BundleFormatError, Provenance
from delta_packager.manifest import canonical_json, provenance_from_dict, provenance_to_dict
from protocol import PrivacyPolicy, PrivacySpend, privacy_violation

RECORD = PrivacySpend(record_epsilon=7.9, record_delta=1e-5)
USER = PrivacySpend(user_epsilon=1.5, user_delta=1e-6)


@pytest.mark.parametrize(
    ("policy", "spend", "verdict"),
    [
        pytest.param(PrivacyPolicy(), None, None, id="no-policy-no-spend"),
        pytest.param(PrivacyPolicy(max_record_epsilon=8.0), RECORD, None, id="record-within"),
        pytest.param(
            PrivacyPolicy(max_record_epsilon=8.0),
            PrivacySpend(record_epsilon=8.0),
            None,
            id="record-at-the-bound",
        ),
        pytest.param(
            PrivacyPolicy(max_record_epsilon=7.5),
            RECORD,
            "spent record-level ε=7.9 > policy max_record_epsilon=7.5",
            id="record-over",
        ),
        pytest.param(
            PrivacyPolicy(max_record_epsilon=8.0),
            None,
            "records no record-level ε (unbounded) > policy max_record_epsilon=8",
            id="record-missing",
        ),
        pytest.param(
            PrivacyPolicy(max_record_epsilon=8.0),
            USER,
            "records no record-level ε (unbounded) > policy max_record_epsilon=8",
            id="the-other-unit-does-not-count",
        ),
        pytest.param(
            PrivacyPolicy(max_user_epsilon=1.0),
            USER,
            "spent user-level ε=1.5 > policy max_user_epsilon=1",
            id="user-over",
        ),
        pytest.param(
            PrivacyPolicy(max_record_epsilon=8.0, max_delta=1e-6),
            RECORD,
            "spent record-level δ=1e-05 > policy max_delta=1e-06",
            id="delta-of-a-bounded-epsilon-over",
        ),
        pytest.param(
            PrivacyPolicy(max_record_epsilon=8.0, max_delta=1e-5),
            PrivacySpend(record_epsilon=2.0),
            "records no record-level δ (unbounded) > policy max_delta=1e-05",
            id="delta-missing",
        ),
        pytest.param(
            PrivacyPolicy(max_delta=1e-5), USER, None, id="delta-only-judges-recorded-units"
        ),
        pytest.param(
            PrivacyPolicy(max_delta=1e-5),
            None,
            "records no ε, δ (unbounded) > policy max_delta=1e-05",
            id="delta-only-nothing-recorded",
        ),
    ],
)
def test_privacy_violation(
    policy: PrivacyPolicy, spend: PrivacySpend | None, verdict: str | None
) -> None:
    assert privacy_violation(policy, spend) == verdict


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_policy_bound_must_be_a_finite_positive_number(bad: float) -> None:
    with pytest.raises(ValueError, match="max_record_epsilon must be a finite number > 0"):
        PrivacyPolicy(max_record_epsilon=bad)


def test_policy_json_round_trip() -> None:
    policy = PrivacyPolicy(max_record_epsilon=8.0, max_delta=1e-5)
    assert policy.to_json() == {"max_record_epsilon": 8.0, "max_delta": 1e-5}
    assert PrivacyPolicy.from_json(policy.to_json()) == policy
    assert PrivacyPolicy.from_json(None) == PrivacyPolicy() and not PrivacyPolicy().is_set
    with pytest.raises(ValueError, match="keys must be among"):
        PrivacyPolicy.from_json({"max_epsilon": 1.0})


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", " 1", "1_0", "1e5", True, None, [1]])
def test_signed_spend_parsing_is_strict(bad: object) -> None:
    with pytest.raises(ValueError, match="privacy.record_epsilon must be"):
        PrivacySpend.from_json({"record_epsilon": bad})
    with pytest.raises(ValueError, match="keys among"):
        PrivacySpend.from_json({"epsilon": "1.0"})


def test_signed_spend_round_trips_exactly() -> None:
    spend = PrivacySpend(record_epsilon=9.1, record_delta=1e-5, user_epsilon=0.3)
    signed = spend.to_signed()
    assert signed == {"record_epsilon": "9.1", "record_delta": "1e-05", "user_epsilon": "0.3"}
    assert PrivacySpend.from_json(signed) == spend
    assert PrivacySpend.from_json(spend.to_json()) == spend


def test_manifest_provenance_keeps_the_spend_by_unit_and_old_bytes() -> None:
    old = provenance_to_dict(Provenance(epsilon=8.0, delta=1e-5))
    assert "record_epsilon" not in old  # a provenance without the spend keeps its bytes
    assert provenance_from_dict(old).privacy() is None
    new = Provenance(record_epsilon=7.9, record_delta=1e-5)
    parsed = provenance_from_dict(provenance_to_dict(new))
    assert parsed == new and parsed.privacy() == RECORD
    assert '"record_epsilon":7.9' in canonical_json(provenance_to_dict(new))
    with pytest.raises(BundleFormatError, match="provenance.record_epsilon"):
        provenance_from_dict({**provenance_to_dict(new), "record_epsilon": -1.0})
