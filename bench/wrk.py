"""Drive load with wrk (a separate C process) and a generated Lua script.

The script counts responses with the expected status (anything else is reported, and a
measurement with unexpected statuses fails loudly), stops each thread after its share
of ``max_requests`` (wrk's ``-d`` bounds the time; wrk itself still waits for ``-d``
before reporting), and prints one ``BENCHJSON`` line.
POST bodies carry a distinct idempotency key per request (run id, thread, counter).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

WRK = shutil.which("wrk") or "/usr/bin/wrk"

_LUA = r"""
local method, path, expect = "%(method)s", "%(path)s", %(expect)d
local max_per_thread = %(max_per_thread)d
local base_headers = %(headers)s
local targets = %(targets)s
local body_format = %(body_format)s
local run = "%(run)s"
local threads = {}
counter, ok, bad, sample = 0, 0, 0, ""

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function request()
  counter = counter + 1
  local h = {}
  for k, v in pairs(base_headers) do h[k] = v end
  local body = nil
  if #targets > 0 then
    local t = targets[((counter * 7919 + tid * 104729) %% #targets) + 1]
    h["Authorization"] = "Bearer " .. t[1]
    body = string.format(body_format, t[2], run, tid, counter, counter %% 5)
  end
  return wrk.format(method, path, h, body)
end

function response(status, headers, body)
  if status == expect then
    ok = ok + 1
  else
    bad = bad + 1
    if sample == "" then sample = status .. " " .. string.sub(body or "", 1, 200) end
  end
  if ok + bad >= max_per_thread then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local o, b, s = 0, 0, ""
  for _, t in ipairs(threads) do
    o = o + t:get("ok")
    b = b + t:get("bad")
    local ts = t:get("sample")
    if s == "" and ts ~= "" then s = ts end
  end
  s = string.gsub(s, '[^%%w%%s%%.:_,/-]', '?')
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"duration_us": %%d, "requests": %%d, "ok": %%d, "bad": %%d, "socket_errors": %%d, '
    .. '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "mean_us": %%.1f, "sample": "%%s"}\n',
    summary.duration, summary.requests, o, b, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0), latency.mean, s))
end
"""


def _lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lua_table(d: dict) -> str:
    return "{" + ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in d.items()) + "}"


@dataclass
class WrkResult:
    duration_s: float
    requests: int
    ok: int
    bad: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    sample: str

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0


def lua_script(*, method: str, path: str, expect: int, max_requests: int, threads: int,
               headers: dict | None = None, targets: list | None = None, body_format: str | None = None,
               run: str = "") -> str:
    return _LUA % {
        "method": method, "path": path, "expect": expect,
        "max_per_thread": max(1, max_requests // threads),
        "headers": _lua_table(headers or {}),
        "targets": "{" + ", ".join("{" + _lua_str(a) + ", " + _lua_str(b) + "}" for a, b in (targets or [])) + "}",
        "body_format": _lua_str(body_format or ""),
        "run": run,
    }


def run_wrk(url: str, script_path: str, *, connections: int, threads: int, duration_s: int,
            timeout_s: int = 30) -> WrkResult:
    cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", f"--timeout={timeout_s}s",
           "-s", script_path, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    d = json.loads(line[len("BENCHJSON "):])
    return WrkResult(
        duration_s=d["duration_us"] / 1e6, requests=d["requests"], ok=d["ok"], bad=d["bad"],
        socket_errors=d["socket_errors"], p50_ms=d["p50_us"] / 1000, p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000, sample=d["sample"],
    )
