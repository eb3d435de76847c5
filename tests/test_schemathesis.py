"""schemathesis against the live API: the OpenAPI document
(:mod:`webapp.api.openapi`, hand-written) against what the API really
accepts and refuses, with the token, on a real writer and the real gunicorn
command line of ``circus.ini`` (:mod:`testkit.gunicorn`).

All of schemathesis's phases run (the document's examples, its boundary
values, random data valid and invalid, and chains of calls) with a fixed
seed and a bounded number of examples per operation, and every one of its
checks: no 5xx; every status, content type and response body as documented;
nothing the document forbids accepted; nothing it allows refused.

Except one kind of refusal, the rules that JSON Schema cannot express
because they relate two values (``since <= until``, ``bid <= ask``, a stop
below the entry of a buy, ...) or the stored state (a market order needs a
tick). The document states each of them in words; :data:`RULES` lists
them with the API's message for each, and a 400 whose message is one of
its operation's rules is counted as *documented*, not as a mismatch. A
second test checks that each rule listed here is stated in the document,
so nothing is excused that the document does not say.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import events, from_schema
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

from db.timestamps import AHEAD, IN_SECONDS
from testkit.gunicorn import Served, serving
from testkit.writer import Stack
from webapp.api.openapi import document
from webapp.api.openapi_components import AHEAD_RULE, SECONDS_RULE

SEED = 20_240_601
#: Examples per operation and phase: about 2,400 requests in all, under a minute here.
MAX_EXAMPLES = 100

SINCE_UNTIL = "(>= since)"
#: Each operation's rules that JSON Schema cannot express: the phrase the document states
#: (a substring of the operation, its parameters or its body schema) -> the API's 400 message.
RULES: dict[str, dict[str, str]] = {
    "GET /api/ticks": {
        SINCE_UNTIL: r"since \d+ is after until \d+",
        "With since": r"after_id: give it with since",
        "With until and without since": r"before_id: give it with until and without since",
    },
    "GET /api/bars": {SINCE_UNTIL: r"since \d+ is after until \d+"},
    "GET /api/indicators": {SINCE_UNTIL: r"since \d+ is after until \d+"},
    "POST /api/ticks": {
        "bid <= ask": r"bid \S+ is above ask \S+",
        "all arrays of one length": r"ticks\.\w+: \d+ values, expected \d+ like ts",
        AHEAD_RULE: AHEAD,
        SECONDS_RULE: IN_SECONDS,
    },
    "POST /api/trades": {
        "stop_loss below the entry for a buy, above for a sell": r"stop_loss \S+ must be (below|above) the entry",
        "take_profit above the entry for a buy, below for a sell": r"take_profit \S+ must be (above|below) the entry",
        "it needs a stored tick": r"no price given and no tick stored for \S+",
        AHEAD_RULE: AHEAD,
        SECONDS_RULE: IN_SECONDS,
        "for a sell, entry + trailing_distance": r"trailing_distance: the trailing stop of a sell at \S+ "
                                                 r"\(entry \+ \S+\): \S+ is not a price",
    },
    "POST /api/trades/{trade_id}/close": {
        "it needs a stored tick": r"no price given and no tick stored for \S+",
    },
}
#: Rules of every operation, stated in the document's own description.
API_RULES: dict[str, str] = {
    # JSON Schema's "integer" is any number without a fractional part, 1.0 included; the API takes
    # only integers written as such.
    "written without a fraction": r"(is not epoch milliseconds \(an integer\)|is not an integer"
                                  r"|expected an integer, got float)",
}


@dataclass
class Tally:
    """What one schemathesis run saw."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: (operation, rule) -> how many 400s it explained.
    documented: Counter[tuple[str, str]] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)

    def summary(self) -> str:
        return (f"{self.cases} cases, responses {dict(sorted(self.statuses.items()))}, {self.server_errors} 5xx, "
                f"{len(self.mismatches)} mismatches, documented 400s "
                f"{dict((f'{o}: {r}', n) for (o, r), n in self.documented.items())}, {len(self.errors)} errors")


def documented_rule(operation: str, response: Any) -> str | None:
    """The rule of ``operation`` that explains this 400, if one does."""
    if response.status_code != 400:
        return None
    try:
        message = json.loads(response.content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    for rule, pattern in [*RULES.get(operation, {}).items(), *API_RULES.items()]:
        if re.search(pattern, message):
            return rule
    return None


def run_schemathesis(url: str, token: str, max_examples: int = MAX_EXAMPLES, seed: int = SEED) -> Tally:
    """Every phase and check of schemathesis against the API at ``url``, the
    built-in "valid data is accepted" check replaced by one that also
    accepts the documented rules' 400s (see the module docstring)."""
    tally = Tally()

    @schemathesis.check
    def positive_data_accepted_unless_documented(ctx: Any, response: Any, case: Any) -> bool | None:
        """positive_data_acceptance, except a 400 from a rule the document states."""
        try:
            return positive_data_acceptance(ctx, response, case)
        except RejectedPositiveData:
            rule = documented_rule(case.operation.label, response)
            if rule is None:
                raise
            tally.documented[(case.operation.label, rule)] += 1
            return None

    config = schemathesis.Config.from_dict({
        "seed": seed,
        "headers": {"Authorization": f"Bearer {token}"},
        "workers": 1,
        "continue-on-failure": True,
        "request-timeout": 30,
        # No state kept between runs (no replay of an earlier run's failures): each run is the seed's.
        "cache": {"enabled": False},
        "generation": {"max-examples": max_examples, "database": "none"},
        "checks": {"positive_data_acceptance": {"enabled": False}},
    })
    schema = schemathesis.openapi.from_url(f"{url}/api/openapi.json", config=config)
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            tally.cases += len(recorder.cases)
            for interaction in recorder.interactions.values():
                if interaction.response is not None:
                    tally.statuses[interaction.response.status_code] += 1
            for case_id, checks in recorder.checks.items():
                interaction = recorder.interactions.get(case_id)
                answer = "" if interaction is None or interaction.response is None else (
                    f"{interaction.response.status_code} {interaction.response.content[:300]!r}")
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        curl = check.failure_info.code_sample.strip().splitlines()[-1].strip()
                        tally.mismatches.append(f"{recorder.label}: {check.name}: {failure.title}; got {answer}\n"
                                                f"    {failure.message.strip()[:300]}\n    {curl[:600]}")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            tally.errors.append(str(getattr(event, "info", None) or getattr(event, "exception", event))[:1000])
    tally.mismatches = sorted(set(tally.mismatches))
    return tally


@pytest.fixture
def api() -> Iterator[tuple[Served, str]]:
    """The real writer and the API's gunicorn in a private home; the token."""
    stack = Stack.create()
    try:
        stack.start_writer()
        with serving(stack.env) as served:
            yield served, (stack.home / "api-token").read_text().strip()
    finally:
        stack.close()


def test_api_does_what_its_openapi_document_says(api: tuple[Served, str]) -> None:
    served, token = api
    tally = run_schemathesis(served.url, token)
    print(tally.summary())
    assert tally.errors == [], tally.errors
    assert tally.cases >= 500, tally.summary()  # it did run: every operation, every phase
    assert tally.server_errors == 0, (tally.summary(), served.log()[-4000:])
    assert tally.mismatches == [], "\n".join([tally.summary(), *tally.mismatches])


def _operation_text(doc: dict[str, Any], label: str) -> str:
    """An operation of the document as text, its parameters and body schema resolved."""
    method, path = label.split(" ", 1)
    op = doc["paths"][path][method.lower()]

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target: Any = doc
                for part in node["$ref"].removeprefix("#/").split("/"):
                    target = target[part]
                return resolve(target)
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return json.dumps(resolve({k: v for k, v in op.items() if k != "responses"}))


def test_every_excused_rule_is_stated_in_the_document() -> None:
    doc = document()
    for label, rules in RULES.items():
        text = _operation_text(doc, label)
        for rule in rules:
            assert rule in text, f"{label}: the document does not state {rule!r}"
    for rule in API_RULES:
        assert rule in doc["info"]["description"], f"the document does not state {rule!r}"
