"""Schemathesis hooks for `make api-check`: the exclusions, each as narrow as the fuzzer
allows. Every one drops a single kind of failure of one check (positive_data_acceptance:
"a schema-valid request was rejected") and only when both the request and the answer show
the one rule that JSON Schema cannot state. README.md ("The API check") lists them.
"""

import json
import math
import re

import schemathesis


# The token's pattern in the document (contract section 10), matched in full.
TOKEN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")


def _whole_floats(value):
    """Whether `value` holds a float with no fraction, such as 5.0."""
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    if isinstance(value, dict):
        return any(_whole_floats(v) for v in value.values())
    if isinstance(value, list):
        return any(_whole_floats(v) for v in value)
    return False


def _name_breaks_rule(name):
    """The service's name rule: 1 to 100 characters after trimming, no U+0000. Python's
    str.strip and Rust's str::trim disagree on a few characters (U+001C..U+001F are
    whitespace to Python only), so a name is only excused when both agree it is bad."""
    if not isinstance(name, str):
        return False
    trimmed = name.strip()
    return trimmed == "" or len(trimmed) > 100 or "\0" in name


def _problem(response):
    try:
        return json.loads(response.content)
    except (ValueError, TypeError):
        return {}


def _fields(problem):
    return [(e.get("field"), e.get("message", "")) for e in problem.get("errors") or []]


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    """Keep every failure except the known non-defects below."""
    if failure.code != "ST202":  # positive_data_acceptance
        return True
    problem = _problem(response)
    body = case.body
    # 0. A Consistency-Token that breaks the header's own documented pattern (the coverage
    #    phase sends `0` as a "valid" value): the 400 is right, the fuzzer's label wrong.
    token = (case.headers or {}).get("Consistency-Token")
    if (
        token is not None
        and not TOKEN.fullmatch(token)
        and problem.get("code") == "bad_request"
        and "Consistency-Token" in problem.get("detail", "")
    ):
        return False
    # 1. A whole-number float (5.0) for an integer field: JSON Schema calls it an integer,
    #    the contract calls it a wrong JSON type (400 bad_request).
    if (
        problem.get("code") == "bad_request"
        and "invalid type: floating point" in problem.get("detail", "")
        and _whole_floats(body)
    ):
        return False
    if problem.get("code") != "validation_failed":
        return True
    fields = _fields(problem)
    items = body.get("transfers") if isinstance(body, dict) else None
    transfers = items if isinstance(items, list) else [body]
    same_account = any(
        isinstance(t, dict) and t.get("from_account_id") == t.get("to_account_id")
        for t in transfers
    )
    # 2. The same account on both sides of a transfer (422): no schema can compare two
    #    properties.
    if same_account and fields and all(
        f == ("to_account_id", "must differ from from_account_id") for f in fields
    ):
        return False
    # 3. A credit that would overflow the receiving account's balance (422): depends on
    #    the stored balance, which the fuzzer may have set to nearly i64::MAX.
    if fields and all(f == "amount" and m.startswith("would overflow") for f, m in fields):
        return False
    # 4. A blank, over-long (after trimming) or NUL-holding account name (422): the rule
    #    counts characters after trimming, which maxLength cannot express.
    if (
        case.operation.path == "/accounts"
        and isinstance(body, dict)
        and _name_breaks_rule(body.get("name"))
        and fields
        and all(f == "name" for f, _ in fields)
    ):
        return False
    return True
