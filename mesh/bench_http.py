"""`moemesh bench --http`: what the HTTP front end adds to TTFT and TPOT, against the SDK, on the
same prompts, the same mesh, in one run.

Each prompt runs through the SDK (`MeshClient`) and through `POST /v1/completions` with
`stream: true` (aiohttp's client reading the SSE lines), one request at a time, the order
alternating from prompt to prompt, all prompts twice (after one warm-up request each way). Both sides are timed by the client the same way: TTFT from
just before the request to the first token carrying text, TPOT as the mean gap between the
tokens carrying text after it. Greedy decoding with `ignore_eos`, so both produce the same text
(checked). Each side's TTFT minus the coordinator's own (from its RequestDone record) is
reported too: what each path adds outside the coordinator, less noisy than the ratio on a
loaded machine. Targets (issue 13): HTTP TTFT <= 1.10 x SDK, TPOT <= 1.05 x SDK (medians).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp

from mesh.client import MeshClient
from mesh.http.process import FrontEnd
from mesh.launcher import Mesh


def _timing(start: float, stamps: list[float]) -> tuple[float, float]:
    ttft = stamps[0] - start
    tpot = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return ttft, tpot


async def _sdk(client: MeshClient, prompt: str, new_tokens: int) -> tuple[str, float, float, float, float]:
    """(text, ttft_s, tpot_s, the coordinator's own ttft_s and tpot_s)"""
    stamps, parts = [], []
    start = time.perf_counter()
    gen = client.generate(prompt, max_new_tokens=new_tokens, stop_at_eos=False)
    async for token in gen:
        if token.text:
            stamps.append(time.perf_counter())
            parts.append(token.text)
    return ("".join(parts), *_timing(start, stamps), gen.done.ttft_s, gen.done.tpot_s)


async def _http(session: aiohttp.ClientSession, url: str, model: str, prompt: str,
                new_tokens: int) -> tuple[str, float, float, float, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    stamps, parts, mesh_ttft, mesh_tpot = [], [], 0.0, 0.0
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if text := (chunk.get("choices") or [{}])[0].get("text"):
                stamps.append(time.perf_counter())
                parts.append(text)
            if "moemesh" in chunk:
                mesh_ttft, mesh_tpot = chunk["moemesh"]["ttft_s"], chunk["moemesh"]["tpot_s"]
    return ("".join(parts), *_timing(start, stamps), mesh_ttft, mesh_tpot)


async def _compare(address: str, url: str, model: str, prompts: list[str], new_tokens: int,
                   rounds: int = 2) -> dict:
    rows = []
    async with MeshClient(address, timeout_s=180) as client, aiohttp.ClientSession() as session:
        await _sdk(client, prompts[0], new_tokens)  # warm-up: cold starts land here, not below
        await _http(session, url, model, prompts[0], new_tokens)
        for i, prompt in enumerate(prompts * rounds):
            if i % 2 == 0:
                sdk = await _sdk(client, prompt, new_tokens)
                http = await _http(session, url, model, prompt, new_tokens)
            else:
                http = await _http(session, url, model, prompt, new_tokens)
                sdk = await _sdk(client, prompt, new_tokens)
            rows.append({"same_text": sdk[0] == http[0], "sdk_ttft_s": sdk[1], "sdk_tpot_s": sdk[2],
                         "http_ttft_s": http[1], "http_tpot_s": http[2],
                         # client-seen TTFT minus the coordinator's own: what each path adds
                         "sdk_added_ttft_s": sdk[1] - sdk[3], "http_added_ttft_s": http[1] - http[3],
                         "sdk_added_tpot_s": sdk[2] - sdk[4], "http_added_tpot_s": http[2] - http[4]})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "same_text"}
    return {
        "prompts": len(prompts), "rounds": rounds, "new_tokens": new_tokens, "text_identical": all(r["same_text"] for r in rows),
        "median": med, "ttft_ratio": med["http_ttft_s"] / med["sdk_ttft_s"],
        "tpot_ratio": med["http_tpot_s"] / med["sdk_tpot_s"], "targets": {"ttft_ratio": 1.10, "tpot_ratio": 1.05},
        # what HTTP adds beyond the SDK outside the coordinator, over the SDK's median: the same
        # ratio with the coordinator's own variation between the two runs taken out
        "ttft_added_s": med["http_added_ttft_s"] - med["sdk_added_ttft_s"],
        "tpot_added_s": med["http_added_tpot_s"] - med["sdk_added_tpot_s"],
        "ttft_ratio_added": 1 + (med["http_added_ttft_s"] - med["sdk_added_ttft_s"]) / med["sdk_ttft_s"],
        "tpot_ratio_added": 1 + (med["http_added_tpot_s"] - med["sdk_added_tpot_s"]) / med["sdk_tpot_s"],
        "rows": rows,
    }


def http_vs_sdk(config, prompts: list[str], new_tokens: int, out: Path) -> dict:
    """Bring a mesh and its HTTP front end up from `config`, compare, write out/http.json."""
    with Mesh(config, quiet=True) as mesh:
        endpoints = mesh.start(180)
        with FrontEnd(config, endpoints["client"], quiet=True) as front:
            url = front.start()
            model = config.http.resolved_model_name(config.model)
            result = asyncio.run(_compare(endpoints["client"], url, model, prompts, new_tokens))
    result["policy"] = config.policy.name
    (out / "http.json").write_text(json.dumps(result, indent=1))
    med = result["median"]
    print(f"text identical (HTTP vs SDK): {result['text_identical']}")
    print(f"TTFT median: HTTP {med['http_ttft_s'] * 1e3:.1f} ms vs SDK {med['sdk_ttft_s'] * 1e3:.1f} ms "
          f"-> {result['ttft_ratio']:.3f}x (target <= 1.10)")
    print(f"  outside the coordinator (client-seen minus the coordinator's own): HTTP "
          f"{med['http_added_ttft_s'] * 1e3:.2f} ms, SDK {med['sdk_added_ttft_s'] * 1e3:.2f} ms "
          f"-> {result['ttft_ratio_added']:.3f}x")
    print(f"TPOT median: HTTP {med['http_tpot_s'] * 1e3:.2f} ms vs SDK {med['sdk_tpot_s'] * 1e3:.2f} ms "
          f"-> {result['tpot_ratio']:.3f}x (target <= 1.05)")
    print(f"  outside the coordinator: HTTP {med['http_added_tpot_s'] * 1e3:.2f} ms, SDK "
          f"{med['sdk_added_tpot_s'] * 1e3:.2f} ms -> {result['tpot_ratio_added']:.3f}x")
    print(f"wrote {out / 'http.json'}")
    return result
