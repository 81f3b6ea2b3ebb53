"""Run the soak: start a server, warm it up, load it, watch it, account for every request.

    sed '/^\\[\\[families.variants\\]\\]/a n_threads = 1' models.toml > /tmp/soak-models.toml
    taskset -c 0 .venv/bin/python scripts/soak.py --models /tmp/soak-models.toml --duration 600

Phases: warm-up load (--warmup s), then idle until nothing runs or waits (the baseline sample),
then load for the rest of --duration, then idle again (the final sample). Memory growth is idle
against idle; descriptors are counted throughout. Every request carries an X-Request-Id, and
afterwards each one that is not deliberately bad must have exactly one canonical `completion`
line in the server's log: the server's own account agrees with the clients'. Exit code 0 when
RSS grew less than --max-growth, the descriptors came back to their baseline, and no request was
lost or failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from edgeserve.config import load_models_file
from edgeserve.tools.processes import free_port, server_process
from edgeserve.tools.soak.requests import KINDS, OUTCOMES, Sent, build, draw, send
from edgeserve.tools.soak.sampling import Growth, Sample, growth, sample

ROOT = Path(__file__).resolve().parents[3]
SETTLE_TIMEOUT_S = 120.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models.toml")
    parser.add_argument("--policy", type=Path, default=ROOT / "policies" / "smollm2-135m.toml")
    parser.add_argument("--cache-dir", type=Path, required=True, help="prepared models and profiles")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load, warm-up included")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of load before the baseline")
    parser.add_argument("--concurrency", type=int, default=6, help="clients sending back to back")
    parser.add_argument("--think-s", type=float, default=0.3, help="each client's mean pause between requests")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--max-growth", type=float, default=0.05, help="largest acceptable RSS growth")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.duration:
        parser.error("--warmup must be positive and shorter than --duration")
    return args


class Soak:
    def __init__(self, base: str, pid: int, args: argparse.Namespace, family: str, variants: list[str]) -> None:
        self.base, self.pid, self.args = base, pid, args
        self.family, self.variants = family, variants
        self.sent: list[Sent] = []
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        self.phase = "warmup"
        self._seq = 0

    def now(self) -> float:
        return time.monotonic() - self.started

    async def load(self, seconds: float, phase: str) -> None:
        self.phase = phase
        until = time.monotonic() + seconds
        sampler = asyncio.create_task(self._sample_until(until))
        await asyncio.gather(*(self._client(i, until) for i in range(self.args.concurrency)))
        await sampler

    async def _client(self, index: int, until: float) -> None:
        """Closed loop with random pauses; its own connection pool, closed at the end of the
        phase, so the idle samples see no client connection."""
        rng = random.Random(self.args.seed * 1000 + index + len(self.sent))
        async with httpx.AsyncClient(base_url=self.base) as client:
            while time.monotonic() < until:
                kind = draw(rng)
                self._seq += 1
                request_id = f"soak-{self._seq}-{kind.name}"
                path, headers, body = build(kind, rng, self.family, self.variants)
                self.sent.append(await send(client, kind, request_id, path, headers, body))
                await asyncio.sleep(rng.expovariate(1 / self.args.think_s))

    async def _sample_until(self, until: float) -> None:
        while time.monotonic() < until:
            self.samples.append(sample(self.pid, self.now(), self.phase))
            await asyncio.sleep(min(self.args.sample_s, max(0.0, until - time.monotonic())))

    async def settle(self, phase: str) -> None:
        """Wait until the server runs and queues nothing, then take an idle sample."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.base) as client:
            while True:
                gauges = parse_gauges((await client.get("/metrics")).text)
                if gauges["edgeserve_running_generations"] == 0 and gauges["edgeserve_queue_depth"] == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not settle in {SETTLE_TIMEOUT_S:.0f} s: {gauges}")
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # closed connections leave the server's descriptor table
        self.samples.append(sample(self.pid, self.now(), phase))


def parse_gauges(text: str) -> dict[str, float]:
    wanted = ("edgeserve_running_generations", "edgeserve_queue_depth")
    found = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(wanted)}
    return {name: found[name] for name in wanted}


@dataclass(frozen=True)
class Account:
    """The server's own account of the requests, from its canonical `completion` lines."""

    completion_lines: int
    missing: list[str]
    duplicated: list[str]
    server_outcomes: dict[str, int]


def server_account(log_path: Path, sent: list[Sent]) -> Account:
    """Each request that is not deliberately bad must have exactly one `completion` log line."""
    lines: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"completion"' in line:
            record = json.loads(line)
            if record.get("event") == "completion":
                lines[record.get("request_id", "")] += 1
                outcomes[record.get("outcome", "")] += 1
    expected = [s.request_id for s in sent if s.outcome != "rejected"]
    return Account(sum(lines[r] for r in expected), [r for r in expected if lines[r] == 0],
                   [r for r in expected if lines[r] > 1], dict(outcomes))


def report(args: argparse.Namespace, soak: Soak, g: Growth, account: Account, exit_code: int | None,
           wall_s: float) -> tuple[str, bool]:
    counts = Counter(s.outcome for s in soak.sent)
    by_kind = {k.name: Counter(s.outcome for s in soak.sent if s.kind == k.name) for k in KINDS}
    accounted = sum(counts[o] for o in OUTCOMES)
    passed = (g.rss_growth < args.max_growth and g.final_fds <= g.baseline_fds and counts["lost"] == 0
              and counts["error"] == 0 and not account.missing and not account.duplicated
              and exit_code == 0)
    lines = [
        f"soak: {args.duration:.0f} s of load ({args.warmup:.0f} s warm-up), {args.concurrency} clients, "
        f"wall {wall_s:.0f} s; {'PASS' if passed else 'FAIL'}",
        f"requests sent {len(soak.sent)} = " + " + ".join(f"{o} {counts[o]}" for o in OUTCOMES)
        + f" (accounted {accounted})",
        *(f"  {name:14s} " + ", ".join(f"{o} {c[o]}" for o in OUTCOMES if c[o]) for name, c in by_kind.items()),
        f"server completion lines for the {len(soak.sent) - counts['rejected']} requests that are not bad: "
        f"{account.completion_lines} (missing {len(account.missing)} {account.missing[:5]}, "
        f"duplicated {len(account.duplicated)} {account.duplicated[:5]}); server outcomes {account.server_outcomes}",
        f"RSS idle after warm-up {g.baseline_rss_mib:.1f} MiB -> idle after load {g.final_rss_mib:.1f} MiB: "
        f"growth {g.rss_growth:+.2%} (limit {args.max_growth:.0%}); peak under load {g.peak_rss_mib:.1f} MiB; "
        f"trend under load {g.trend_mib_per_min:+.3f} MiB/min",
        f"of which anonymous (not the mapped GGUF files) {g.baseline_anon_mib:.1f} -> {g.final_anon_mib:.1f} MiB: "
        f"growth {g.anon_growth:+.2%}",
        f"open fds idle {g.baseline_fds} -> {g.final_fds}; under load {g.fds_min}..{g.fds_max}",
        f"server exit code after SIGTERM: {exit_code}",
    ]
    return "\n".join(lines), passed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    family = load_models_file(args.models).families[0]
    variants = [f"{family.name}:{v.name}" for v in family.variants]
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "server.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "edgeserve.cli", "serve", "--models", str(args.models),
               "--policy", str(args.policy), "--cache-dir", str(args.cache_dir), "--host", "127.0.0.1",
               "--port", str(port)]
    began = time.monotonic()
    with server_process("edgeserve", command, f"{base}/ready", log_path,
                        env={"EDGESERVE_LOG_FORMAT": "json"}, timeout_s=900) as server:
        soak = Soak(base, server.process.pid, args, family.name, variants)

        async def run() -> None:
            await soak.load(args.warmup, "warmup")
            await soak.settle("baseline")
            await soak.load(args.duration - args.warmup, "load")
            await soak.settle("final")

        asyncio.run(run())
    exit_code = server.process.returncode  # server_process sent SIGTERM and waited
    g = growth(soak.samples)
    account = server_account(log_path, soak.sent)
    text, passed = report(args, soak, g, account, exit_code, time.monotonic() - began)
    print(text)
    (args.out / "summary.txt").write_text(text + "\n")
    (args.out / "samples.json").write_text(json.dumps([asdict(s) for s in soak.samples], indent=1))
    (args.out / "requests.jsonl").write_text("".join(json.dumps(asdict(s)) + "\n" for s in soak.sent))
    return 0 if passed else 1
