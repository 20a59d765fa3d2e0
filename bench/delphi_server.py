#!/usr/bin/env python3
"""A loopback OpenAI-compatible chat-completions server with a fixed latency per request,
for benchmarking LLM clients (bench/delphi_job.py) without the LLM being the variable.

Every POST to .../chat/completions is answered after exactly --latency-ms (asyncio sleep, so
any number of requests wait at once): an explainer prompt (its system message asks for an
`[EXPLANATION]:` line) gets a short answer ending in such a line; any other prompt is taken as
a detection/fuzzing scorer prompt and gets a list of 0/1 with one entry per `Example N:` line
of its last user message (both delphi's prompts and ours number the excerpts that way), the
digit a hash of the line so answers are deterministic. HTTP/1.1 keep-alive is supported (httpx
and reqwest both pool connections).

GET /stats returns the counters as JSON: requests, explainer and scorer requests, peak requests
in flight, and the mean in flight over the time since the first request after the last reset
(the time integral of the in-flight count divided by that span). POST /reset zeroes them.

    python bench/delphi_server.py [--port 0] [--latency-ms 100]

prints `listening on http://127.0.0.1:PORT/v1` once ready and serves until killed.
"""
import argparse
import asyncio
import hashlib
import json
import re
import time

EXAMPLE_LINE = re.compile(r"^Example \d+:.*$", re.MULTILINE)


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.requests = 0
        self.explainer = 0
        self.scorer = 0
        self.malformed = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.first = None
        self.last_change = None
        self.area = 0.0  # integral of in_flight over time

    def _advance(self):
        now = time.perf_counter()
        if self.last_change is not None:
            self.area += self.in_flight * (now - self.last_change)
        self.last_change = now
        if self.first is None:
            self.first = now

    def enter(self):
        self._advance()
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self):
        self._advance()
        self.in_flight -= 1

    def as_json(self):
        span = (self.last_change - self.first) if self.first is not None else 0.0
        return {
            "requests": self.requests,
            "explainer": self.explainer,
            "scorer": self.scorer,
            "malformed": self.malformed,
            "peak_in_flight": self.peak_in_flight,
            "mean_in_flight": self.area / span if span > 0 else 0.0,
            "span_s": span,
        }


def answer(request, stats):
    """The assistant's text for a chat request (a dict); counts it as explainer or scorer call."""
    messages = request.get("messages") or []
    system = messages[0].get("content", "") if messages else ""
    last = messages[-1].get("content", "") if messages else ""
    if "[EXPLANATION]" in system:
        stats.explainer += 1
        return "The marked tokens share one theme.\n[EXPLANATION]: Tokens of one recurring theme."
    stats.scorer += 1
    bits = [str(hashlib.blake2b(m.group(0).encode(), digest_size=1).digest()[0] & 1)
            for m in EXAMPLE_LINE.finditer(last)]
    return "[" + ", ".join(bits) + "]"


async def handle(reader, writer, latency, stats):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    key, value = line.split(":", 1)
                    headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            close = headers.get("connection", "").lower() == "close"
            if method == "GET" and path.endswith("/stats"):
                status, payload = "200 OK", json.dumps(stats.as_json())
            elif method == "POST" and path.endswith("/reset"):
                stats.reset()
                status, payload = "200 OK", "{}"
            elif method == "POST" and path.endswith("/chat/completions"):
                stats.enter()
                try:
                    request = json.loads(body)
                    text = answer(request, stats)
                    await asyncio.sleep(latency)
                    status = "200 OK"
                    payload = json.dumps({
                        "id": f"bench-{stats.requests}",
                        "object": "chat.completion",
                        "model": request.get("model", "bench"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": len(text) // 4,
                                  "total_tokens": len(body) // 4 + len(text) // 4},
                    })
                except (ValueError, AttributeError, IndexError, TypeError) as e:
                    stats.malformed += 1
                    status, payload = "400 Bad Request", json.dumps({"error": {"message": str(e)}})
                finally:
                    stats.leave()
            else:
                status, payload = "404 Not Found", json.dumps({"error": {"message": f"no route {path}"}})
            data = payload.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                f"connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + data)
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=100.0)
    args = p.parse_args()
    stats = Stats()
    latency = args.latency_ms / 1000

    server = await asyncio.start_server(lambda r, w: handle(r, w, latency, stats), "127.0.0.1", args.port,
                                        backlog=1024, limit=1 << 24)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
