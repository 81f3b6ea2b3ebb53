"""Deadline-carrying chat completions with GSM8K questions, on an open-loop arrival plan.

Every request comes from a plan made before the run (edgeserve.tools.loadplan): Poisson arrivals at a
scenario's rate, each with a deadline class. A pool of users takes the next planned arrival,
sleeps until its moment and sends it, so the offered load does not slow down when the server
does (a closed loop would hide overload). Each response is reported to Locust as its outcome —
request name `met`, `missed`, `refused` or `error`, request type the variant that answered
(X-Edgeserve-Variant), the refusal code, or `timeout` — and written as one JSON line to
--events-out for the exact summary. Loopback targets only.

Run it through `edgeserve loadtest`, which starts the servers, measures the service time and
passes these options; by hand:

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8080 -u 40 -r 40 \\
        --run-time 61s --questions gsm8k/test.jsonl --scenario steady --service-ms 1400 \\
        --model smollm2-135m --events-out /tmp/events.jsonl
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import gevent
import locust.stats
import msgspec
import requests
from locust import User, events, task
from locust.env import Environment

from edgeserve.tools.loadplan import Arrival, Event, classify, load_scenarios, plan_arrivals

HERE = Path(__file__).resolve().parent
LEAD_S = 0.5  # the plan starts this long after the test does, so every user is spawned by then


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("edgeserve load test")
    group.add_argument("--questions", env_var="EDGESERVE_LOADTEST_QUESTIONS", default="",
                       help="JSONL file whose lines have a `question` (GSM8K format)")
    group.add_argument("--scenario", default="steady", help="a scenario of --scenarios-file")
    group.add_argument("--scenarios-file", default=str(HERE / "scenarios.toml"))
    group.add_argument("--service-ms", type=float, default=0.0,
                       help="time one request takes alone at --max-tokens (capacity = 1 / this)")
    group.add_argument("--model", default="smollm2-135m", help="the `model` field of every request")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--seed", type=int, default=1)
    group.add_argument("--grace-s", type=float, default=1.0,
                       help="how long past its deadline a client still waits for the answer")
    group.add_argument("--arrival-window-s", type=float, default=0.0,
                       help="seconds of arrivals (default: the run time less 1 s)")
    group.add_argument("--events-out", default="", help="append one JSON line per request here")


class Plan:
    """The run's arrivals, handed out one at a time to whichever user is free."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        assert options is not None
        _check_loopback(environment.host or "")
        if options.service_ms <= 0:
            _fail("--service-ms must be the measured service time in ms")
        try:
            scenarios = load_scenarios(Path(options.scenarios_file))
        except (OSError, ValueError) as exc:
            _fail(str(exc))
        if options.scenario not in scenarios:
            _fail(f"no scenario {options.scenario!r}; known: {', '.join(scenarios)}")
        window = options.arrival_window_s or max(1.0, float(options.run_time or 61) - 1.0)
        self.arrivals: Iterator[Arrival] = iter(
            plan_arrivals(scenarios[options.scenario], window, options.service_ms, options.seed))
        self.questions = _questions(Path(options.questions))
        self.model: str = options.model
        self.max_tokens: int = options.max_tokens
        self.grace_s: float = options.grace_s
        self.start = math.inf  # set when the test starts
        self.out = Path(options.events_out).open("ab") if options.events_out else None  # noqa: SIM115
        self.encoder = msgspec.json.Encoder()

    def claim(self) -> Arrival | None:
        return next(self.arrivals, None)

    def record(self, event: Event) -> None:
        if self.out is not None and not self.out.closed:  # no greenlet switch inside a file write
            self.out.write(self.encoder.encode(event) + b"\n")
            self.out.flush()


def _fail(message: str) -> NoReturn:
    """Exit with a code of its own: 1 only means that some requests were errors."""
    print(f"locustfile: {message}", file=sys.stderr, flush=True)
    raise SystemExit(3)


def _check_loopback(host: str) -> None:
    name = urlsplit(host).hostname or ""
    try:
        loopback = name == "localhost" or ip_address(name).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        _fail(f"refusing to load-test {host!r}: loopback addresses only")


def _questions(path: Path) -> list[str]:
    if not path.is_file():
        _fail(f"--questions {str(path)!r} is not a file (JSONL with `question`)")
    questions = [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
    if not questions:
        _fail(f"{path} has no questions")
    return questions


_plan: Plan | None = None


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    """Check the options and make the plan before anything is sent."""
    global _plan
    if environment.parsed_options is not None and not environment.parsed_options.list_commands:
        _plan = Plan(environment)


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    if _plan is not None:
        _plan.start = time.monotonic() + LEAD_S


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    if _plan is not None and _plan.out is not None:
        _plan.out.close()


@events.quitting.add_listener
def _last_csv_rows(environment: Environment, **_: Any) -> None:
    """Locust rewrites its CSV once a second and not at exit: without one more round, requests
    that ended in the last second (those still running when the run time was up) would be
    missing from it."""
    if environment.parsed_options is not None and environment.parsed_options.csv_prefix:
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


class DeadlineClient(User):
    """Sends planned requests; the time between them is the plan's, not a think time."""

    def on_start(self) -> None:
        self.session = requests.Session()
        self.next: Arrival | None = None

    def on_stop(self) -> None:
        self.session.close()

    def wait_time(self) -> float:
        assert _plan is not None
        self.next = _plan.claim()
        if self.next is None:
            return 3600.0  # the plan is spent: idle until Locust stops the run
        return max(0.0, _plan.start + self.next.at_s - time.monotonic())

    @task
    def ask(self) -> None:
        arrival, self.next = self.next, None
        if arrival is None or _plan is None:  # the first round: no arrival claimed yet
            return
        plan = _plan
        lag_ms = max(0.0, (time.monotonic() - plan.start - arrival.at_s) * 1000)
        # a UUID: llama_cpp.server answers any other X-Request-Id with an empty 400
        headers = {"X-Request-Id": f"00000000-0000-4000-8000-{arrival.index:012d}"}
        if arrival.send_deadline:
            headers["X-Deadline-Ms"] = str(arrival.deadline_ms)
        # repeat_penalty explicit: llama_cpp.server's default is 1.1, edgeserve's 1.0
        body = {"model": plan.model, "max_tokens": plan.max_tokens, "temperature": 0, "repeat_penalty": 1.0,
                "messages": [{"role": "user",
                              "content": plan.questions[arrival.question % len(plan.questions)]}]}
        timeout_s = arrival.deadline_ms / 1000 + plan.grace_s
        status: int | None = None
        payload: dict[str, Any] = {}
        response_headers: Any = {}
        exception: Exception | None = None
        timed_out = False
        length = 0
        sent = time.perf_counter()
        try:
            response = self.session.post(f"{self.environment.host}/v1/chat/completions", json=body, headers=headers,
                                         timeout=(5.0, timeout_s))
            status, length, response_headers = response.status_code, len(response.content), response.headers
            payload = _json(response)
        except requests.Timeout as exc:
            timed_out, exception = True, exc
        except requests.RequestException as exc:
            exception = exc
        elapsed_ms = (time.perf_counter() - sent) * 1000
        outcome = classify(status, elapsed_ms, arrival.deadline_ms, timed_out=timed_out)
        info = payload.get("edgeserve") or {}
        error = payload.get("error") or {}
        variant = response_headers.get("X-Edgeserve-Variant")
        event = Event(
            index=arrival.index, deadline_class=arrival.deadline_class, deadline_ms=arrival.deadline_ms,
            outcome=outcome, elapsed_ms=round(elapsed_ms, 1), status=status, lag_ms=round(lag_ms, 1),
            code=error.get("code") if status != 200 else None, variant=variant, finish=info.get("finish"),
            completion_tokens=(payload.get("usage") or {}).get("completion_tokens"), timed_out=timed_out,
        )
        plan.record(event)
        if outcome == "error" and exception is None:
            detail = error.get("message") or payload.get("detail") or "no body"
            exception = RuntimeError(f"HTTP {status}: {detail}")
        kind = ("timeout" if timed_out else (variant or "unrouted") if status == 200
                else event.code or (str(status) if status else "connection"))
        self.environment.events.request.fire(
            request_type=kind, name=outcome, response_time=elapsed_ms, response_length=length,
            exception=exception if outcome == "error" else None,
            context={"deadline_class": arrival.deadline_class}, url="/v1/chat/completions",
        )


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
