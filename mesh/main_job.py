"""The mesh's main job: serve a mixed prompt set on the bundled model and report the bill.

Prompts come from ../shared/data/prompts (GSM8K test problems and MT-bench questions); where
that folder is absent a few built-in prompts stand in. The first prompt streams to stdout; the
rest run concurrently beside it (continuous batching). Then the meter's summary: GB-s and money
against the all-local baseline, TTFT/TPOT and SLO attainment, cold starts; and, with
`compare_with`, the same prompts replayed on fresh meshes under those policies (all-local and
all-remote by default), measured by their meters in the same run, in one table.
"""

from __future__ import annotations

import asyncio
import json
import sys

from mesh.client import MeshClient
from nodes.corpus import shared_data_dir

FALLBACK = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "def fibonacci(n):",
    "The purpose of a license is",
]


def job_prompts(n: int) -> list[str]:
    root = shared_data_dir()
    prompts: list[str] = []
    try:
        gsm = [json.loads(x) for x in (root / "gsm8k_test.jsonl").read_text().splitlines()[:n]]
        mt = [json.loads(x) for x in (root / "mt_bench.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        print(f"prompts: {root} not found (nor a shared/data/prompts above the working directory); "
              f"{len(FALLBACK)} built-in prompts stand in (run from a checkout beside ../shared for the "
              "GSM8K and MT-bench prompts the README's figures use)", file=sys.stderr)
        return (FALLBACK * n)[:n]
    coding = [q["turns"][0] for q in mt if q["category"] == "coding"]
    writing = [q["turns"][0] for q in mt if q["category"] in ("writing", "humanities")]
    for i in range(n):
        kind = i % 3
        if kind == 0:
            prompts.append(f"Question: {gsm[i // 3]['question']}\nAnswer:")
        elif kind == 1:
            prompts.append(coding[i // 3 % len(coding)])
        else:
            prompts.append(writing[i // 3 % len(writing)])
    return prompts


def compare_table(config, prompts: list[str], max_new_tokens: int, ours: dict,
                  policies: tuple[str, ...] = ("all-local", "all-remote")) -> list[dict]:
    """The same prompts (all sent at once, as above) on a fresh mesh per policy; rows of the
    meters' figures with ours first, printed as a table."""
    from mesh import compare
    from mesh import workload as wl

    requests = tuple(wl.WorkloadRequest(0.0, p, len(p), len(p), max_new_tokens, "default", "main-job", {})
                     for p in prompts)
    work = wl.Workload({"source": "mesh-up --run-main-job", "requests": len(prompts)}, requests)
    rows = [ours]
    for policy in policies:
        overrides = {"billing.mode": config.billing.mode, "model.path": config.model.path,
                     "policy.profiles": config.policy.profiles}
        row = compare.run_one(compare.run_config(policy, config.billing.mode, None, overrides, None), work,
                              label=policy)
        rows.append({"policy": policy, "gb_s": row["gb_s"], "cost": row["cost"],
                     "slo": row["slo_attainment"], "functions": row["functions"]})
    base = next((r["cost"] for r in rows if r["policy"] == "all-local"), None)
    print(f"\n=== the same {len(prompts)} prompts under each policy (each mesh's own meter, {config.billing.mode} "
          "mode, from the first request to the last reply) ===")
    print(f"{'policy':<14}{'GB-s':>10}{'cost $':>14}{'vs all-local':>14}{'SLO met':>9}{'functions':>11}")
    for r in rows:
        ratio = f"{r['cost'] / base:.2f}x" if base else "-"
        print(f"{r['policy']:<14}{r['gb_s']:>10.3f}{r['cost']:>14.8f}{ratio:>14}{r['slo']:>9.0%}{r['functions']:>11}")
    return rows


async def run_main_job(address: str, n_prompts: int = 6, max_new_tokens: int = 24, config=None,
                       compare_with: tuple[str, ...] = ()) -> int:
    prompts = job_prompts(n_prompts)
    async with MeshClient(address, timeout_s=120) as client:
        async def one(i: int, prompt: str):
            gen = client.generate(prompt, max_new_tokens=max_new_tokens, slo_class="default")
            pieces = []
            async for token in gen:
                pieces.append(token.text)
                if i == 0:
                    print(token.text, end="", flush=True)
            return prompt, "".join(pieces), gen.done

        before = (await client.status())["billing"]  # the bill of the start-up, left out of the comparison
        print(f"--- prompt 1 of {len(prompts)} (streaming) ---\n{prompts[0][:200]}", flush=True)
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        print("\n")
        for prompt, text, done in results[1:]:
            print(f"--- {prompt[:70]!r}\n    -> {text[:120]!r}  (ttft {done.ttft_s:.3f} s, tpot {done.tpot_s:.3f} s)")
        status = await client.status()
    billing, slo = status["billing"], status["slo"]
    print("\n=== meter ===")
    print(f"policy        {status['policy'].get('name')}: {len(status['instances'])} function instance(s) started")
    base = billing.get("baseline_all_local_gb_s")
    line = f"billed        {billing['gb_s']:.3f} GB-s (${billing['cost']:.8f}, {billing['mode']} mode)"
    if base:
        line += f"; all-local baseline {base:.3f} GB-s"
    print(line)
    for name, c in slo["classes"].items():
        if c["requests"]:
            print(f"SLO {name:<10} {c['attained']}/{c['requests']} met; TTFT p50 {c['ttft']['p50']:.3f} s "
                  f"(target {c['ttft_target_s']} s), TPOT p50 {c['tpot']['p50']:.3f} s (target {c['tpot_target_s']} s)")
    colds = [i for i in status["instances"] if i.get("started_at")]
    print(f"cold starts   {len(colds)}; engine {status['engine']}")
    ok = all(r[2] is not None for r in results)
    if config is not None and compare_with:
        met = sum(bool(r[2] and r[2].record["slo"]["met"]) for r in results) / len(results)
        ours = {"policy": f"{status['policy'].get('name')} (this mesh)", "gb_s": billing["gb_s"] - before["gb_s"],
                "cost": billing["cost"] - before["cost"], "slo": met,
                "functions": len({i["function_id"] for i in status["instances"]})}
        await asyncio.to_thread(compare_table, config, prompts, max_new_tokens, ours, compare_with)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(run_main_job(sys.argv[1])))
