"""Load test of `bitnest serve`: one sliced-int8 checkpoint, every fixed precision and the adaptive policy, under a
stepped load of concurrent streaming clients (loopback only; bounded in time; stops by itself).

    python bench/serve.py [--models ref-10m,1.1b] [--phase-s 20] [--steps 1,8,32,8,1] [--max-tokens 32] [--quick]

Per model, one `bitnest serve` process for the fixed rows (each request names its precision: int8, int4, int2),
then a fresh `--policy adaptive` process (ladder int8 → int4 → int2; SLO = p99 time to first token, by default
midway between what fixed int8 and the best fixed narrower width achieved at the peak; --max-queue). Each
configuration replays the same stepped load: `--steps` concurrent clients for `--phase-s` seconds each; a client sends a streaming completion
(a short prompt, `--max-tokens` new tokens, greedy), waits for it, and sends the next until its phase ends.
The adaptive row's requests name no precision, so the server's controller picks. Reported per configuration:
completion tokens/s over the whole run and per phase, request latency p50/p99 and time to first token p50/p99
(client side, queueing included). A plot per model shows the adaptive run: clients, the precision served, and
each request's latency over time, next to the fixed rows' latency per phase.

The 1.1B-shape model is a TinyLlama-1.1B-shaped Llama with random weights (bench/speed.py builds and caches it
in runs/bench_speed/): its text is noise, its speed is real.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, header, write_json, write_section  # noqa: E402

CACHE = ROOT / "runs" / "bench_speed"
PROMPTS = ["Once upon a time", "The history of the city", "In 1990, the band", "The river flows", "She said that",
           "The first step is", "A new study shows", "The game was played"]


def sliced8(name: str, data_dir) -> Path:
    """The sliced-int8 (nested) checkpoint of a model, built and cached by bench/speed.py's helper."""
    import speed
    if name == "ref-10m":
        from bitnest.paths import data_file
        return speed.sliced8_checkpoint(data_file("models/ref-10m", data_dir), "ref-10m")
    return speed.sliced8_checkpoint(speed.synthetic_dir(), "tinyllama-1.1b-shape")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, a, slo_ms: float | None = None) -> tuple[subprocess.Popen, str]:
    """`--policy fixed` without an SLO, `--policy adaptive` with one."""
    port = free_port()
    cmd = [sys.executable, "-m", "bitnest.cli", "serve", "--model", str(ckpt), "--port", str(port),
           "--max-batch", str(a.max_batch)]
    if slo_ms is not None:
        cmd += ["--policy", "adaptive", "--max-queue", str(a.max_queue), "--slo-ms", f"{slo_ms:.0f}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "BITNEST_SHUTDOWN_TIMEOUT": "60"}
    CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(CACHE.parent / "serve_server.log", "a"))
    url = f"http://127.0.0.1:{port}"
    import httpx
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see runs/serve_server.log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 10 min")


async def one_request(client, url, body) -> dict:
    t0 = time.monotonic()
    first, prec, n = None, None, 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if first is None:
                first = time.monotonic()
            prec = ev.get("precision") or prec
            if "usage" in ev:
                n = ev["usage"]["completion_tokens"]
    t1 = time.monotonic()
    return {"start": t0, "end": t1, "latency": t1 - t0, "ttft": (first or t1) - t0, "tokens": n, "precision": prec}


async def run_load(url: str, precision: str | None, a, t_origin: float) -> tuple[list[dict], list[dict]]:
    """The stepped load; returns (requests, precision samples)."""
    import httpx
    reqs, samples = [], []
    stop_sampling = asyncio.Event()
    limits = httpx.Limits(max_connections=max(a.steps) + 4, max_keepalive_connections=max(a.steps) + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def sampler():
            while not stop_sampling.is_set():
                try:
                    st = (await client.get(url + "/v1/precision", timeout=5)).json()
                    samples.append({"t": time.monotonic() - t_origin, "policy": st["current"], "serving": st["serving"],
                                    "queue": st["queue"]})
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)

        async def client_loop(i: int, phase: int, until: float):
            k = 0
            while time.monotonic() < until:
                body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": a.max_tokens, "temperature": 0,
                        "stream": True}
                if precision is not None:
                    body["precision"] = precision
                r = await one_request(client, url, body)
                r.update(phase=phase, clients=a.steps[phase], start=r["start"] - t_origin, end=r["end"] - t_origin)
                reqs.append(r)
                k += 1

        samp = asyncio.create_task(sampler())
        for phase, n in enumerate(a.steps):
            until = time.monotonic() + a.phase_s
            await asyncio.gather(*(client_loop(i, phase, until) for i in range(n)))
        stop_sampling.set()
        await samp
    return reqs, samples


def _print(row: dict) -> None:
    print(f"{row['model']:8s} {row['config']:11s} {row['tok_s']:8.1f} tok/s  p50 {row['p50_latency_s']:.2f} s  p99 "
          f"{row['p99_latency_s']:.2f} s  TTFT p50/p99 {row['p50_ttft_s']:.2f}/{row['p99_ttft_s']:.2f} s  "
          f"served {row['served']}", flush=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(model: str, config: str, reqs: list[dict], a) -> dict:
    wall = max(r["end"] for r in reqs) - min(r["start"] for r in reqs)
    row = {"model": model, "config": config, "requests": len(reqs), "tokens": sum(r["tokens"] for r in reqs),
           "wall_s": wall, "tok_s": sum(r["tokens"] for r in reqs) / wall,
           "p50_latency_s": pct([r["latency"] for r in reqs], 0.5), "p99_latency_s": pct([r["latency"] for r in reqs], 0.99),
           "p50_ttft_s": pct([r["ttft"] for r in reqs], 0.5), "p99_ttft_s": pct([r["ttft"] for r in reqs], 0.99),
           "served": {p: sum(1 for r in reqs if r["precision"] == p) for p in sorted({r["precision"] for r in reqs})}}
    row["phases"] = []
    for ph, n in enumerate(a.steps):
        rs = [r for r in reqs if r["phase"] == ph]
        if rs:
            span = max(r["end"] for r in rs) - min(r["start"] for r in rs)
            row["phases"].append({"clients": n, "tok_s": sum(r["tokens"] for r in rs) / span,
                                  "p50_latency_s": pct([r["latency"] for r in rs], 0.5),
                                  "p99_latency_s": pct([r["latency"] for r in rs], 0.99),
                                  "p99_ttft_s": pct([r["ttft"] for r in rs], 0.99),
                                  "served": {p: sum(1 for r in rs if r["precision"] == p) for p in sorted({r["precision"] for r in rs})}})
    return row


def plot(model: str, adaptive: dict, fixed_rows: list[dict], a, slo_ms: float) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reqs, samples = adaptive["requests"], adaptive["samples"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    bits = {"int8": 8, "int6": 6, "int4": 4, "int3": 3, "int2": 2}
    ts = [s["t"] for s in samples]
    ax1.step(ts, [bits.get(s["policy"], float("nan")) for s in samples], where="post", label="policy precision (bits)")
    ax1.step(ts, [s["queue"] for s in samples], where="post", alpha=0.6, label="queue + running")
    # phases as they ran (a phase ends when its clients' last requests finish, so they drift past phase_s)
    edges = [min((r["start"] for r in reqs if r["phase"] == i), default=i * a.phase_s) for i in range(len(a.steps))]
    edges.append(max(r["end"] for r in reqs))
    for i, n in enumerate(a.steps):
        ax1.axvspan(edges[i], edges[i + 1], color="grey", alpha=0.05 + 0.05 * (i % 2))
        ax1.text((edges[i] + edges[i + 1]) / 2, 0.5, f"{n} clients", ha="center", fontsize=8)
    ax1.set_ylabel("bits / requests")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"bitnest serve --policy adaptive, {model}: stepped load {' → '.join(map(str, a.steps))} clients")
    for p, c in (("int8", "C0"), ("int4", "C1"), ("int2", "C2")):
        xs = [r["end"] for r in reqs if r["precision"] == p]
        ax2.scatter(xs, [r["latency"] for r in reqs if r["precision"] == p], s=8, color=c, label=f"served at {p}")
    for fr, ls in zip(fixed_rows, (":", "--", "-.")):
        for i, ph in enumerate(fr["phases"]):
            ax2.hlines(ph["p50_latency_s"], edges[i], edges[i + 1], linestyles=ls, colors="k", alpha=0.6,
                       label=f"{fr['config']} p50" if i == 0 else None)
    ttft = [r["ttft"] for r in reqs]
    ax2.scatter([r["start"] + r["ttft"] for r in reqs], ttft, s=6, marker="x", color="grey", alpha=0.5, label="TTFT")
    ax2.axhline(slo_ms / 1e3, color="red", lw=1, label=f"SLO (p99 TTFT) {slo_ms:.0f} ms")
    ax2.set_yscale("log")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("latency / TTFT (s)")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7, ncol=4)  # below: never over the points
    fig.tight_layout()
    out = RESULTS / f"serve_{model}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ref-10m,1.1b")
    ap.add_argument("--phase-s", type=float, default=20.0)
    ap.add_argument("--steps", default="1,8,32,8,1")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--slo-ms", type=float, help="adaptive SLO (p99 TTFT); default midway between int8 and the best narrower fixed width at the peak")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir")
    ap.add_argument("--quick", action="store_true", help="smoke run: ref-10m, 2 s phases, 1,4 clients; writes nothing")
    a = ap.parse_args()
    if a.quick:
        a.models, a.phase_s, a.steps, a.max_tokens = "ref-10m", 2.0, "1,8,1", 8
    a.steps = [int(s) for s in a.steps.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows, sections, requests_log = [], [], []
    for model in a.models.split(","):
        ckpt = sliced8(model, a.data_dir)
        fixed = []
        proc, url = start_server(ckpt, a)
        try:
            for config, prec in (("fixed int8", "int8"), ("fixed int4", "int4"), ("fixed int2", "int2")):
                reqs, _ = asyncio.run(run_load(url, prec, a, time.monotonic()))
                fixed.append(summarize(model, config, reqs, a))
                _print(fixed[-1])
        finally:
            proc.terminate()
            proc.wait(120)
        peak = a.steps.index(max(a.steps))
        # the SLO an operator would set here: between what int8 and the best narrower width deliver at the peak (p99 TTFT)
        best = min(f["phases"][peak]["p99_ttft_s"] for f in fixed[1:])
        slo = a.slo_ms or 1e3 * (fixed[0]["phases"][peak]["p99_ttft_s"] + best) / 2
        proc, url = start_server(ckpt, a, slo_ms=slo)
        try:
            reqs, samples = asyncio.run(run_load(url, None, a, time.monotonic()))
            import httpx
            ad = summarize(model, "adaptive", reqs, a)
            ad["policy_changes"] = httpx.get(url + "/v1/precision").json()["changes"]
            _print(ad)
        finally:
            proc.terminate()
            proc.wait(120)
        for r in fixed + [ad]:
            r["slo_ms"] = slo
        rows += fixed + [ad]
        if a.quick:  # a smoke run writes nothing (not even the figure)
            continue
        png = plot(model, {"requests": reqs, "samples": samples}, fixed, a, slo)
        requests_log.append({"model": model, "slo_ms": slo, "requests": reqs, "samples": samples})
        sections.append(_table(model, fixed + [ad], png, a, slo, peak))
    if a.quick:
        return 0
    write_json("serve.json", rows)
    write_json("serve_requests.json", requests_log)  # every request and policy sample: figures can be redrawn
    note = (f"Stepped load {' → '.join(map(str, a.steps))} concurrent streaming clients, {a.phase_s:g} s each; greedy, "
            f"{a.max_tokens} new tokens per request; fixed rows: one server, each request names its precision; adaptive: "
            f"a fresh server `--policy adaptive --max-queue {a.max_queue} --slo-ms SLO`; `--max-batch {a.max_batch}`, "
            f"{a.threads} threads, client on the same "
            "machine (it shares the 2 cores). tok/s = completion tokens ÷ wall time; latency = request sent → last "
            "token; TTFT = sent → first token (client side, queueing included). "
            f"Run time {(time.perf_counter() - t_start) / 60:.1f} min.\n")
    write_section("serve", header("Serving: fixed precisions and the adaptive policy under a stepped load", note)
                  + "\n" + "\n\n".join(sections))
    return 0


def _table(model: str, rows: list[dict], png: Path, a, slo_ms: float, peak: int) -> str:
    head = ("| config | tok/s | " + " | ".join(f"tok/s @{n}" for n in a.steps) +
            " | latency p50 / p99 (s) | TTFT p50 / p99 (s) | " + f"p99 TTFT @{a.steps[peak]} (s) | requests served at |")
    lines = [f"### {model}", "", head, "|" + "---|" * (len(a.steps) + 6)]
    for r in rows:
        ph = " | ".join(f"{p['tok_s']:.1f}" for p in r["phases"])
        served = ", ".join(f"{k} {v}" for k, v in r["served"].items())
        lines.append(f"| {r['config']} | {r['tok_s']:.1f} | {ph} | {r['p50_latency_s']:.2f} / {r['p99_latency_s']:.2f} | "
                     f"{r['p50_ttft_s']:.2f} / {r['p99_ttft_s']:.2f} | {r['phases'][peak]['p99_ttft_s']:.2f} | {served} |")
    ad = rows[-1]
    ch = ad.get("policy_changes", [])
    last = ad["phases"][-1]["served"]
    i8, i4 = rows[0], rows[1]
    at8 = a.steps.index(8) if 8 in a.steps else None
    checks = [
        (f"adaptive p99 TTFT at the peak within the SLO ({slo_ms:.0f} ms) where fixed int8 is not",
         ad["phases"][peak]["p99_ttft_s"] * 1e3 <= slo_ms < i8["phases"][peak]["p99_ttft_s"] * 1e3,
         f"adaptive {ad['phases'][peak]['p99_ttft_s'] * 1e3:.0f} ms, int8 {i8['phases'][peak]['p99_ttft_s'] * 1e3:.0f} ms"),
        ("adaptive back at int8 when the load drops (last phase)", bool(ch) and ch[-1]["to"] == "int8",
         f"last change {ch[-1]['from']}→{ch[-1]['to']}" if ch else "no change"),
    ]
    if at8 is not None:
        ratio = i4["phases"][at8]["tok_s"] / i8["phases"][at8]["tok_s"]
        checks.append(("int4 throughput at 8 clients ≥ 2× int8", ratio >= 2, f"{ratio:.2f}×"))
    lines += ["", f"SLO for the adaptive run: p99 TTFT {slo_ms:.0f} ms "
              f"({'given' if a.slo_ms else 'midway between fixed int8 and the best fixed width at the peak'}). Last phase served at: "
              + ", ".join(f"{k} {v}" for k, v in last.items()) + "."]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name} — {detail}" for name, ok, detail in checks]
    lines += ["", f"Adaptive policy changes ({len(ch)}): " + "; ".join(f"{c['from']}→{c['to']} ({c['reason']})" for c in ch[:16])]
    lines += ["", f"![{model} adaptive serving](bench/results/{png.name})"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
