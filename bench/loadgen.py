"""A small Python load generator, run as its own process: ``python -m bench.loadgen < spec.json``.

Two modes, both bounded by a request count and a deadline, printing one JSON object:

* ``batch``: threads with keep-alive connections post 1,000-event bodies (each event with
  its own idempotency key) and count the per-event results the server accepted;
* ``warm``: a few GETs of each page from several threads, so every worker has served
  them (imports, template compilation) before anything is timed;
* ``pages``: sequential GETs of several pages *interleaved* round-robin on one keep-alive
  connection, so the floor page and the measured pages see the same machine load (the
  machine is shared); reports each page's median latency.

No Django import.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time


def _accepted(payload) -> int:
    """Events the server accepted in one batch response (per-event status 200/201)."""
    results = payload.get("results") if isinstance(payload, dict) else payload
    if not isinstance(results, list):
        return 0
    n = 0
    for r in results:
        status = r.get("status", r.get("status_code")) if isinstance(r, dict) else None
        if status in (200, 201):
            n += 1
    return n


def run_pages(spec: dict) -> dict:
    host, port = spec["host"], spec["port"]
    pages = spec["pages"]  # [{"label", "path", "headers"}]
    rounds = spec["rounds"]
    deadline = time.monotonic() + spec["max_seconds"]
    lat: dict[str, list[float]] = {p["label"]: [] for p in pages}
    bad: dict[str, str] = {}
    conn = http.client.HTTPConnection(host, port, timeout=120)
    done = 0
    for _ in range(rounds):
        if time.monotonic() >= deadline:
            break
        for page in pages:
            t = time.perf_counter()
            try:
                conn.request("GET", page["path"], headers=page["headers"])
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
                status = f"error {exc}"
            elapsed = time.perf_counter() - t
            if status == 200:
                lat[page["label"]].append(elapsed)
            else:
                bad.setdefault(page["label"], str(status))
        done += 1
    conn.close()
    out = {"rounds": done, "bad": bad, "pages": {}}
    for label, xs in lat.items():
        xs.sort()
        out["pages"][label] = {
            "n": len(xs),
            "p50_ms": round(xs[len(xs) // 2] * 1000, 2) if xs else None,
            "p90_ms": round(xs[int(len(xs) * 0.9)] * 1000, 2) if xs else None,
            "min_ms": round(xs[0] * 1000, 2) if xs else None,
        }
    return out


def run_warm(spec: dict) -> dict:
    """GET each page ``rounds`` times from ``concurrency`` threads (so every worker serves some)."""
    bad: dict[str, str] = {}
    deadline = time.monotonic() + spec["max_seconds"]

    def worker() -> None:
        conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=120)
        for _ in range(spec["rounds"]):
            for page in spec["pages"]:
                if time.monotonic() >= deadline:
                    return
                try:
                    conn.request("GET", page["path"], headers=page["headers"])
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        bad.setdefault(page["label"], str(resp.status))
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=120)
                    bad.setdefault(page["label"], f"error {exc}")
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(spec["concurrency"])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"bad": bad}


def run(spec: dict) -> dict:
    if spec.get("mode") == "pages":
        return run_pages(spec)
    if spec.get("mode") == "warm":
        return run_warm(spec)
    host, port = spec["host"], spec["port"]
    path = spec["path"]
    targets = spec["targets"]  # [[raw key, [product codes]], ...]
    per_request = spec["events_per_request"]
    max_requests = spec["max_requests"]
    concurrency = spec["concurrency"]
    deadline = time.monotonic() + spec["max_seconds"]
    run_id = spec["run"]
    lock = threading.Lock()
    state = {"next": 0, "ok_requests": 0, "bad_requests": 0, "events": 0, "sample": "", "latencies": []}

    def body_for(n: int) -> tuple[str, bytes]:
        key, codes = targets[n % len(targets)]
        events = [
            {"product": codes[i % len(codes)], "kind": "consume", "quantity": 1,
             "idempotency_key": f"{run_id}-b{n}-{i}", "user": f"u{i % 5}@bench.example",
             "service": ("rendering", "simulation", "analysis")[i % 3]}
            for i in range(per_request)
        ]
        return key, json.dumps({"events": events}).encode()

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        while True:
            with lock:
                n = state["next"]
                if n >= max_requests or time.monotonic() >= deadline:
                    break
                state["next"] += 1
            key, body = body_for(n)
            t = time.monotonic()
            try:
                conn.request("POST", path, body=body, headers={
                    "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
                status, raw = 0, str(exc).encode()
            elapsed = time.monotonic() - t
            try:
                accepted = _accepted(json.loads(raw)) if status in (200, 201, 207) else 0
            except ValueError:
                accepted = 0
            with lock:
                state["latencies"].append(elapsed)
                state["events"] += accepted
                if status in (200, 201, 207) and accepted == per_request:
                    state["ok_requests"] += 1
                else:
                    state["bad_requests"] += 1
                    if not state["sample"]:
                        state["sample"] = f"{status} {raw[:300].decode(errors='replace')}"
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - started
    lat = sorted(state.pop("latencies"))
    return {**state, "requests": state["ok_requests"] + state["bad_requests"], "wall_s": wall,
            "p50_s": lat[len(lat) // 2] if lat else None}


if __name__ == "__main__":
    print(json.dumps(run(json.load(sys.stdin))))
