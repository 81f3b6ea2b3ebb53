"""Structured answers under tight deadlines: how many parse and validate (issue 16).

Sends JSON-mode and JSON-schema requests with tight deadlines to a running edgeserve, one at a
time, and counts per deadline: answered, refused (429), late (by the client's clock), answers
that parse (and validate against the schema), and answers edgeserve had to close early
(`structure_closed_early`: without the closing they would have been cut mid-JSON, invalid).

    .venv/bin/python scripts/structured_deadlines.py --base http://127.0.0.1:8080 \\
        [--deadlines 300,600,1200,2400] [--requests 10] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
import jsonschema

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "city": {"type": "string"}, "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person who lives by the sea.", "Invent a character for a story.",
           "Describe your favourite teacher.", "Describe a farmer and what they like to do."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--deadlines", default="300,600,1200,2400")
    parser.add_argument("--requests", type=int, default=10, help="per deadline and format")
    args = parser.parse_args()
    formats = {"json_object": {"type": "json_object"},
               "json_schema": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    print(f"{'format':>12s} {'deadline':>9s} {'answered':>9s} {'refused':>8s} {'late':>5s} {'valid':>6s} "
          f"{'closed early':>13s}")
    with httpx.Client(base_url=args.base, timeout=60) as http:
        for name, response_format in formats.items():
            for deadline in (int(d) for d in args.deadlines.split(",")):
                answered = refused = late = valid = closed = 0
                for i in range(args.requests):
                    body = {"model": args.model, "max_tokens": 256, "temperature": 0.7, "seed": i,
                            "response_format": response_format,
                            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                    started = time.perf_counter()
                    reply = http.post("/v1/chat/completions", json=body, headers={"X-Deadline-Ms": str(deadline)})
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    if reply.status_code == 429:
                        refused += 1
                        continue
                    reply.raise_for_status()
                    answered += 1
                    late += elapsed_ms > deadline
                    data = reply.json()
                    closed += bool(data["edgeserve"]["structure_closed_early"])
                    try:
                        parsed = json.loads(data["choices"][0]["message"]["content"])
                        if name == "json_schema":
                            jsonschema.validate(parsed, PERSON)
                        valid += isinstance(parsed, dict)
                    except (ValueError, jsonschema.ValidationError):
                        pass
                print(f"{name:>12s} {deadline:>7d}ms {answered:>9d} {refused:>8d} {late:>5d} "
                      f"{valid:>3d}/{answered:<2d} {closed:>10d}/{answered}")


if __name__ == "__main__":
    main()
