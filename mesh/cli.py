"""`moemesh`: the command line.

    moemesh ask "prompt"               stream an answer from a running mesh (mesh-up prints its address)
    moemesh generate "prompt"          run the model in this process (the monolithic baseline)
    moemesh status                     nodes, function instances, billing and SLOs of a running mesh
    moemesh plan --policy remoe        print the plan a policy makes for a prompt
    moemesh bench                      measure the mesh against raw ZeroMQ and the in-process engine
    moemesh profile                    measure expert functions on this host (the allocator's profiles)
    moemesh trace --out DIR            record activation traces (in process, or through a mesh)
    moemesh predictor-eval             evaluate the predictors on activation traces
    moemesh tui                        the live dashboard
    moemesh synth --preset NAME        write a realistic-size checkpoint (Qwen1.5-MoE, DeepSeek-V2-Lite, Mixtral shapes)
    moemesh keys --out DIR --name NAME make a CURVE key pair for [security] (NAME.public, NAME.secret)
    moemesh workload poisson --out F   write a workload file (Azure trace window, Poisson, Gamma)
    moemesh compare --workload F       every chosen policy on one workload file, against a real mesh
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

DEFAULT_ADDRESS = "tcp://127.0.0.1:7555"


def _address(args) -> str:
    return args.address or DEFAULT_ADDRESS


def cmd_ask(args) -> int:
    from mesh.client import MeshClient
    from mesh.errors import MeshError

    async def run() -> int:
        async with MeshClient(_address(args), timeout_s=args.timeout) as client:
            gen = client.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  seed=args.seed, slo_class=args.slo_class)
            async for token in gen:
                print(token.text, end="", flush=True)
            print()
            d = gen.done
            print(f"[{d.generated_tokens} tokens, {d.finish_reason}; TTFT {d.ttft_s:.3f} s, TPOT {d.tpot_s:.3f} s, "
                  f"SLO {'met' if d.record.get('slo', {}).get('met') else 'missed'}]", file=sys.stderr)
            if args.record:
                print(json.dumps(d.record, indent=1))
        return 0

    try:
        return asyncio.run(run())
    except MeshError as exc:
        print(f"moemesh ask: {exc}", file=sys.stderr)
        return 2


def cmd_generate(args) -> int:
    from mesh.config import resolve_model_path
    from nodes.model.checkpoint import Checkpoint
    from nodes.model.engine import Engine, SamplingParams
    from nodes.model.tokenizer import StreamDecoder, Tokenizer

    path = resolve_model_path(args.model)
    start = time.perf_counter()
    print(f"loading {path} ...", end="", file=sys.stderr, flush=True)
    model = Checkpoint(path).load_model()
    tokenizer = Tokenizer.from_dir(path)
    print(f" {time.perf_counter() - start:.2f} s", file=sys.stderr)
    engine = Engine(model)
    decoder = StreamDecoder(tokenizer)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    n = 0
    for _, token in engine.generate([tokenizer.encode(args.prompt)], params):
        n += 1
        print(decoder.push(token), end="", flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    from mesh.client import MeshClient
    from mesh.errors import MeshError

    async def run() -> dict:
        async with MeshClient(_address(args)) as client:
            return await client.status()

    try:
        status = asyncio.run(run())
    except MeshError as exc:
        print(f"moemesh status: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=1, default=str))
        return 0
    print(f"policy {status['policy'].get('name')}   model {status['model']}")
    for n in status["nodes"]:
        print(f"node {n['name']:<8} {n['kind']} {'alive' if n['alive'] else 'DOWN'}  capacity {n['capacity_gb']} GB")
    for i in status["instances"]:
        print(f"  {i['instance_id']:<16} {i['state']:<9} {i['memory_gb']:.2f} GB  experts {i['experts']}  "
              f"calls {i['invocations']}")
    b = status["billing"]
    print(f"billed {b['gb_s']:.3f} GB-s = ${b['cost']:.8f} ({b['mode']} mode)")
    return 0


def cmd_plan(args) -> int:
    from allocator.model import Workload
    from allocator.render import render_plan
    from mesh import planning
    from mesh.config import load_config, resolve_model_path
    from nodes.model.config import MoEConfig
    from nodes.model.tokenizer import Tokenizer

    overrides = {"policy.name": args.policy}
    config = load_config(args.config, overrides)
    path = resolve_model_path(config.model.path)
    model = MoEConfig.from_file(path)
    tokens = len(Tokenizer.from_dir(path).encode(args.prompt))
    workload = Workload(prompt_tokens=max(1, tokens), new_tokens=args.max_new_tokens)
    plan = planning.make_plan(config, model, workload=workload)
    print(render_plan(plan, planning.model_shape(model, planning.dtype_bytes(config))))
    return 0


def cmd_bench(args) -> int:
    from mesh.bench import main as bench_main

    return bench_main(args.rest)


def cmd_trace(args) -> int:
    from mesh.trace import main as trace_main

    return trace_main(args.rest)


def cmd_profile(args) -> int:
    from mesh.profile import main as profile_main

    return profile_main(args.rest)


def cmd_predictor_eval(args) -> int:
    from predictor.evaluate import main as eval_main

    return eval_main(args.rest)


def cmd_workload(args) -> int:
    from mesh.workload import main as workload_main

    return workload_main(args.rest)


def cmd_compare(args) -> int:
    from mesh.compare import main as compare_main

    return compare_main(args.rest)


def cmd_tui(args) -> int:
    from tui.cli import main as tui_main

    return tui_main(args.rest)


def cmd_keys(args) -> int:
    from mesh.errors import ConfigError

    if args.bench:
        from mesh.security_bench import main as bench_main

        return bench_main(["--frames", str(args.bench_frames)])
    if not args.out:
        print("moemesh keys: --out DIR is required (or --bench)", file=sys.stderr)
        return 2
    from mesh.security import make_keys

    try:
        for name in args.name or ["coordinator"]:
            public, secret = make_keys(args.out, name, force=args.force)
            print(f"{name}: {public} (share it), {secret} (mode 0600: keep it on its host)")
    except ConfigError as exc:
        print(f"moemesh keys: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_synth(args) -> int:
    from nodes.synth.cli import run as synth_run

    return synth_run(args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moemesh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="stream an answer from a running mesh")
    p.add_argument("prompt")
    p.add_argument("--address", help=f"the mesh's client address (default {DEFAULT_ADDRESS}; mesh-up prints it)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int)
    p.add_argument("--slo-class", default="default", help="a class of [slo.classes] in launch.toml")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each token")
    p.add_argument("--record", action="store_true", help="print the meter's per-request JSON record")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("generate", help="run the model in this process (no mesh)")
    p.add_argument("prompt")
    p.add_argument("--model", default="bundled", help="model directory (HF layout) or 'bundled'")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("status", help="nodes, instances, billing of a running mesh")
    p.add_argument("--address")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plan", help="print the plan a policy makes for a prompt")
    p.add_argument("--policy", default="remoe")
    p.add_argument("--prompt", default="Question: A farmer has 12 cows and buys 7 more. How many cows?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--config", default="launch.toml")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("keys", help="make CURVE key pairs for [security] in launch.toml")
    p.add_argument("--out", help="folder for the key files (security.keys_dir)")
    p.add_argument("--name", action="append",
                   help="key pair name (repeatable): coordinator, client, or a [[hosts]] name "
                   "(default: coordinator)")
    p.add_argument("--force", action="store_true", help="replace an existing pair")
    p.add_argument("--bench", action="store_true",
                   help="instead: measure CURVE's throughput cost on 8 KiB frames (loopback)")
    p.add_argument("--bench-frames", type=int, default=20000, help="frames per --bench run")
    p.set_defaults(func=cmd_keys)

    from nodes.synth.cli import HELP as SYNTH_HELP
    from nodes.synth.cli import add_arguments as synth_arguments

    p = sub.add_parser("synth", help="write a synthetic checkpoint with a real model's per-layer shapes",
                       description=SYNTH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth_arguments(p)
    p.set_defaults(func=cmd_synth)

    for name, func, text in (("bench", cmd_bench, "benchmarks (see `moemesh bench --help`)"),
                             ("profile", cmd_profile, "measure expert functions on this host (see --help)"),
                             ("predictor-eval", cmd_predictor_eval, "evaluate predictors on traces"),
                             ("trace", cmd_trace, "record activation traces"),
                             ("tui", cmd_tui, "the live dashboard"),
                             ("workload", cmd_workload, "write a workload file (see --help)"),
                             ("compare", cmd_compare, "policies on one workload against a real mesh (see --help)")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)

    argv = sys.argv[1:] if argv is None else argv
    passthrough = {"bench": cmd_bench, "profile": cmd_profile, "predictor-eval": cmd_predictor_eval, "tui": cmd_tui,
                   "trace": cmd_trace, "workload": cmd_workload, "compare": cmd_compare}
    if argv and argv[0] in passthrough:  # these parse their own flags
        return passthrough[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
