"""Deadline-carrying chat completions on an open-loop arrival plan.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080                       # web UI
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 --headless -u 4 -r 2 -t 30s

Every request comes from a plan made when the test starts (edgeserve.tools.loadplan): Poisson
arrivals at a scenario's rate, each with a deadline class, both relative to the *service time*
S — how long one request takes alone at --max-tokens. A pool of users takes the next planned
arrival, sleeps until its moment and sends it, so the offered load does not slow down when the
server does (a closed loop would hide overload); with too few users (-u) requests go out late,
which each event records as `lag_ms`. Each response is reported to Locust as its outcome —
request name `met`, `missed`, `refused` or `error`, request type the variant that answered
(X-Edgeserve-Variant), the refusal code, or `timeout` — and, with --events-out, written as one
JSON line for the exact summary. Loopback targets only.

Defaults need nothing from the user: the questions are loadtests/questions.jsonl, `model` is the
first model the server lists at /v1/models (edgeserve: its first family), and S is read from the
server when the test starts — edgeserve's own prediction for one request without a deadline at
--max-tokens (X-Edgeserve-Predicted-Ms, from its live cost profiles), or, from any other
OpenAI-compatible server, one such request measured after a warm-up. `--service-ms`, `--model`
and `--questions` override them; `edgeserve loadtest` gives all three, so every target of its
runs gets the same plan.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

from edgeserve.tools.loadplan import (
    Arrival,
    Event,
    Scenario,
    classify,
    first_model,
    load_scenarios,
    plan_arrivals,
    read_questions,
    users_needed,
)

HERE = Path(__file__).resolve().parent
LEAD_S = 0.5  # the plan starts this long after the test does, so every user is spawned by then
UNTIMED_WINDOW_S = 3600.0  # arrivals planned for a run without --run-time (stop it when you like)
PROBE_TIMEOUT_S = 600.0
log = logging.getLogger("locustfile")


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("edgeserve load test")
    group.add_argument("--questions", env_var="EDGESERVE_LOADTEST_QUESTIONS", default=str(HERE / "questions.jsonl"),
                       help="JSONL file whose lines have a `question` (GSM8K format; default: the 22 short "
                            "questions in loadtests/questions.jsonl)")
    group.add_argument("--scenario", default="steady", help="a scenario of --scenarios-file (steady, overload, burst)")
    group.add_argument("--scenarios-file", default=str(HERE / "scenarios.toml"))
    group.add_argument("--service-ms", type=float, default=0.0,
                       help="time one request takes alone at --max-tokens (capacity = 1 / this); 0: read it from "
                            "the server (edgeserve's /metrics, else one measured request)")
    group.add_argument("--model", default="",
                       help="the `model` field of every request (default: the first model of /v1/models)")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--seed", type=int, default=1)
    group.add_argument("--grace-s", type=float, default=1.0,
                       help="how long past its deadline a client still waits for the answer")
    group.add_argument("--arrival-window-s", type=float, default=0.0,
                       help="seconds of arrivals (default: the run time less 1 s, or an hour without one)")
    group.add_argument("--events-out", default="", help="append one JSON line per request here")


class PlanError(Exception):
    """An option or the server does not allow a plan; the message says which."""


@dataclass(frozen=True)
class Setup:
    """What the plan is made from: the options, the model and the service time S."""

    host: str
    scenario: Scenario
    questions: list[str]
    model: str
    service_ms: float
    source: str  # where S came from
    key: tuple[object, ...]  # the options it was read with (the web UI may change them)


def _key(environment: Environment) -> tuple[object, ...]:
    o = environment.parsed_options
    assert o is not None
    return (environment.host, o.questions, o.scenario, o.scenarios_file, o.service_ms, o.model, o.max_tokens)


def read_setup(environment: Environment) -> Setup:
    """Check the options; ask the server for the model and S unless they were given."""
    options = environment.parsed_options
    assert options is not None
    key = _key(environment)
    host = (environment.host or "").rstrip("/")
    _check_loopback(host)
    if options.max_tokens < 1 or options.grace_s < 0 or options.service_ms < 0:
        raise PlanError("--max-tokens must be >= 1, --grace-s and --service-ms >= 0")
    try:
        scenarios = load_scenarios(Path(options.scenarios_file))
    except (OSError, ValueError) as exc:
        raise PlanError(str(exc)) from None
    if options.scenario not in scenarios:
        raise PlanError(f"no scenario {options.scenario!r}; known: {', '.join(scenarios)}")
    try:
        questions = read_questions(Path(options.questions))
    except (OSError, ValueError, KeyError) as exc:
        raise PlanError(f"--questions {options.questions!r}: {exc!r} (JSONL with a `question` per line)") from None
    model: str = options.model or first_model(_get_json(host, "/v1/models")) or ""
    if not model:
        raise PlanError(f"{host}/v1/models lists no model; give --model")
    if options.service_ms:
        ms, source = options.service_ms, "--service-ms"
    else:
        ms, source = read_service_ms(host, model, questions[0], options.max_tokens)
    return Setup(host, scenarios[options.scenario], questions, model, ms, source, key)


def _get_json(host: str, path: str) -> Any:
    try:
        response = requests.get(f"{host}{path}", timeout=10)
        response.raise_for_status()
        return response.json()
    except (requests.RequestException, ValueError) as exc:
        raise PlanError(f"cannot read {host}{path}: {exc} (is the server up? else give --model "
                        "and --service-ms)") from None


def read_service_ms(host: str, model: str, question: str, max_tokens: int) -> tuple[float, str]:
    """S and where it came from. One streamed request alone at max_tokens, no deadline and no
    budget hint: edgeserve names the variant it routes such a request to and its predicted time
    in the first response headers (X-Edgeserve-Variant, X-Edgeserve-Predicted-Ms, from its live
    cost profiles), and the request is dropped at once (the server cancels it at its next step).
    Any other server gets the same request again, measured send to last byte after this warm-up."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0,
                            "stream": True, "messages": [{"role": "user", "content": question}]}
    url, headers = f"{host}/v1/chat/completions", {"X-Budget-Hint": "off"}
    try:
        with requests.Session() as session:
            with session.post(url, json=body, headers=headers, stream=True, timeout=(5, PROBE_TIMEOUT_S)) as first:
                first.raise_for_status()
                predicted = first.headers.get("X-Edgeserve-Predicted-Ms")
                variant = first.headers.get("X-Edgeserve-Variant", model)
                if predicted:
                    return float(predicted), f"predicted by the server for {variant} alone at {max_tokens} tokens"
                for _ in first.iter_lines():  # not edgeserve: a warm-up
                    pass
            started = time.perf_counter()
            with session.post(url, json=body, headers=headers, stream=True, timeout=(5, PROBE_TIMEOUT_S)) as second:
                second.raise_for_status()
                for _ in second.iter_lines():
                    pass
            return (time.perf_counter() - started) * 1000, f"one request alone at {max_tokens} tokens, measured"
    except (requests.RequestException, ValueError) as exc:
        raise PlanError(f"cannot read the service time from {host} (give --service-ms): {exc}") from None


class Plan:
    """The run's arrivals, handed out one at a time to whichever user is free."""

    def __init__(self, environment: Environment, setup: Setup, prepared_s: float) -> None:
        options = environment.parsed_options
        assert options is not None
        run_time = float(options.run_time or 0)
        window = options.arrival_window_s or (
            max(1.0, run_time - 1.0 - prepared_s) if run_time else UNTIMED_WINDOW_S)
        self.arrivals: Iterator[Arrival] = iter(
            plan_arrivals(setup.scenario, window, setup.service_ms, options.seed))
        self.host = setup.host  # checked: a loopback address
        self.questions = setup.questions
        self.model = setup.model
        self.max_tokens: int = options.max_tokens
        self.grace_s: float = options.grace_s
        self.start = time.monotonic() + LEAD_S
        self.out = Path(options.events_out).open("ab") if options.events_out else None  # noqa: SIM115
        self.encoder = msgspec.json.Encoder()
        users = environment.runner.target_user_count if environment.runner is not None else 0
        peak_rps = setup.scenario.peak_load * 1000 / setup.service_ms
        log.info("scenario %s: S = %.1f ms (%s), %.2f requests/s at peak, model %s, %.0f s of arrivals",
                 options.scenario, setup.service_ms, setup.source, peak_rps, setup.model, window)
        busy = math.ceil(peak_rps * (setup.scenario.max_deadline_ms(setup.service_ms) / 1000 + options.grace_s))
        if users and users < busy:
            log.warning("%d users may be too few: at %.2f requests/s, each waiting up to its deadline + %g s, %d "
                        "can be busy at once (suggested: -u %d); a request no user is free for goes out late "
                        "(lag_ms)", users, peak_rps, options.grace_s, busy,
                        users_needed(setup.scenario, setup.service_ms, options.grace_s))

    def claim(self) -> Arrival | None:
        return next(self.arrivals, None)

    def record(self, event: Event) -> None:
        if self.out is not None and not self.out.closed:  # no greenlet switch inside a file write
            self.out.write(self.encoder.encode(event) + b"\n")
            self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


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
        raise PlanError(f"refusing to load-test {host!r}: loopback addresses only (--host http://127.0.0.1:PORT)")


_setup: Setup | None = None
_plan: Plan | None = None


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    """A run that starts by itself (--headless, --autostart) reads its setup now, before the run
    time counts, and stops at once on a bad option; the web UI reads it when a test starts, with
    the host and options of its form."""
    global _setup
    options = environment.parsed_options
    if options is None or options.list_commands or not (options.headless or options.autostart):
        return
    try:
        _setup = read_setup(environment)
    except PlanError as exc:
        _fail(str(exc))


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    global _setup, _plan
    if environment.parsed_options is None:
        return
    started = time.monotonic()
    try:  # a setup read at init serves the first start only: the web UI asks the server again
        setup = _setup if _setup is not None and _setup.key == _key(environment) else read_setup(environment)
        _setup = None
    except PlanError as exc:
        log.error("locustfile: %s", exc)
        _plan = None
        if environment.web_ui is None:  # the web UI stays up: fix the form and start again
            environment.process_exit_code = 3
        runner = environment.runner
        if runner is not None:
            gevent.spawn_later(0.1, runner.quit if environment.web_ui is None else runner.stop)
        return
    _plan = Plan(environment, setup, time.monotonic() - started)


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    if _plan is not None:
        _plan.close()


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
        if _plan is None:  # the setup failed: the run is being stopped
            return 3600.0
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
            response = self.session.post(f"{plan.host}/v1/chat/completions", json=body, headers=headers,
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
        raw_error = payload.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        variant = response_headers.get("X-Edgeserve-Variant")
        event = Event(
            index=arrival.index, deadline_class=arrival.deadline_class, deadline_ms=arrival.deadline_ms,
            outcome=outcome, elapsed_ms=round(elapsed_ms, 1), status=status, lag_ms=round(lag_ms, 1),
            code=error.get("code") if status != 200 else None, variant=variant, finish=info.get("finish"),
            completion_tokens=(payload.get("usage") or {}).get("completion_tokens"), timed_out=timed_out,
            predicted_ms=info.get("predicted_ms"), actual_ms=info.get("actual_ms"), queue_ms=info.get("queue_ms"),
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
