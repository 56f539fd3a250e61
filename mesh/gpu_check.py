"""The GPU check (issue 14): GPU tests and main-model decode TPOT on cuda vs cpu, as JSON.

One command on a GPU host runs the GPU tests and a decode TPOT comparison of the main model
on the GPU against the CPU in the same run, and writes JSON.

    python -m mesh.gpu_check --out gpu-check                 # a few minutes on a GPU host
    python -m mesh.gpu_check --out gpu-check --skip-tests    # only the TPOT comparison

Writes to --out:
    gpu_check.json   environment (torch, CUDA, NVML figures), test counts and failures,
                     per preset: TTFT and decode TPOT on cpu and cuda, their ratio, whether the
                     greedy tokens are identical, the largest prefill logit difference
    gpu-tests.log    pytest's output; gpu-tests.xml its JUnit report

Presets: "bundled" (the shipped 8 MB model) and "realistic" (a random Mixtral-shaped model of
~0.64 B parameters, float32, built in memory: hidden 1024, 8 layers x 8 experts of 2816, top-2,
vocab 32000); "synth:PRESET[:LAYERS]" loads a nodes/synth checkpoint of a real model's shapes
(e.g. synth:qwen1.5-moe-a2.7b:2; written on first use). On a host without CUDA it still runs: the tests report skipped, the JSON says
cuda is unavailable, and only the CPU side of the bundled preset is timed. The exit code is
1 when a test failed or errored, else 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from mesh.config import MeshConfig
from mesh.device import device_name, move_model, resolve_device
from nodes import resources
from nodes.model.cache import Segment
from nodes.model.checkpoint import Checkpoint
from nodes.model.config import MoEConfig
from nodes.model.engine import Engine, SamplingParams
from nodes.model.model import MoEModel

TESTS = ["tests/gpu", "tests/nodes/test_device.py", "tests/mesh/test_staging.py", "tests/mesh/test_gpu_pricing.py"]
REALISTIC = dict(model_type="mixtral", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                 num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
                 max_position_embeddings=4096, eos_token_id=None)
PRESETS = ("bundled", "realistic")


# -- tests ---------------------------------------------------------------------------------------


def run_tests(out: Path, timeout_s: float) -> dict:
    xml = out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--junitxml={xml}", *TESTS]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log = f"{exc.stdout or ''}{exc.stderr or ''}\n[gpu_check] pytest ran past {timeout_s:g} s: stopped"
        code = None
    (out / "gpu-tests.log").write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    result = {"command": " ".join(cmd), "returncode": code, "seconds": time.perf_counter() - start,
              **junit_counts(xml)}
    result["ok"] = code in (0, 5) and not result["failed"] and not result["errors"]  # 5: nothing collected
    return result


def junit_counts(xml: Path) -> dict:
    """passed / failed / errors / skipped / xfailed counts and the failures' names and messages."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "failures": [],
              "skip_reasons": []}
    if not xml.exists():
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None:
            counts["failed"] += 1
            counts["failures"].append({"test": name, "message": (failure.get("message") or "")[:2000]})
        elif error is not None:
            counts["errors"] += 1
            counts["failures"].append({"test": name, "message": (error.get("message") or "")[:2000]})
        elif skipped is not None:
            kind = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
            counts[kind] += 1
            reason = skipped.get("message") or ""
            if reason not in counts["skip_reasons"]:
                counts["skip_reasons"].append(reason)
        else:
            counts["passed"] += 1
    return counts


# -- TPOT -----------------------------------------------------------------------------------------


def preset_model(name: str) -> MoEModel:
    if name == "bundled":
        return Checkpoint(MeshConfig().model.resolved_path()).load_model()
    if name == "realistic":
        torch.manual_seed(0)
        return MoEModel(MoEConfig.from_hf_dict(REALISTIC)).eval()
    if name.startswith("synth:"):  # synth:PRESET[:LAYERS], a nodes/synth checkpoint (written on first use)
        from nodes.synth import ensure_checkpoint

        _, preset, *layers = name.split(":")
        return Checkpoint(ensure_checkpoint(preset, int(layers[0]) if layers else None, progress=False)).load_model()
    raise SystemExit(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)} or synth:PRESET[:LAYERS]")


def prompts_for(model: MoEModel, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_decode(model: MoEModel, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy decode of the batch: TTFT (the prefill step), TPOT (mean of the decode steps)."""
    device = next(model.parameters()).device
    engine = Engine(model, max_batch=len(prompts))
    warm = Engine(model, max_batch=len(prompts))  # kernels, allocator and CUDA context warmed first
    warm.complete(prompts, SamplingParams(max_new_tokens=3, stop_at_eos=False))
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    seqs = [engine.add(p, params) for p in prompts]
    sync(device)
    start = time.perf_counter()
    engine.step()
    ttft = time.perf_counter() - start
    steps = []
    while engine.active:
        t = time.perf_counter()
        engine.step()  # reads the tokens back: the step has finished on the device
        steps.append(time.perf_counter() - t)
    steps.sort()
    return {"device": device_name(device), "ttft_s": ttft, "tpot_s": sum(steps) / len(steps),
            "tpot_p50_s": steps[len(steps) // 2], "decode_steps": len(steps),
            "tokens": [s.generated for s in seqs]}


def prefill_logits(model: MoEModel, prompt: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    return model(torch.tensor(prompt), [Segment(0, len(prompt), cache)]).float().cpu()


def compare(name: str, cuda: torch.device | None, batch: int, prompt_len: int, new_tokens: int) -> dict:
    start = time.perf_counter()
    model = preset_model(name)
    params = sum(p.numel() for p in model.parameters())
    prompts = prompts_for(model, batch, prompt_len)
    row: dict = {"preset": name, "parameters": params, "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
                 "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                 "cpu_threads": torch.get_num_threads()}
    cpu = timed_decode(model, prompts, new_tokens)
    row["cpu"] = {k: v for k, v in cpu.items() if k != "tokens"}
    if cuda is None:
        row["cuda"] = None
        row["note"] = "cuda unavailable: CPU side only"
    else:
        gpu_model = move_model(copy.deepcopy(model), cuda)
        gpu = timed_decode(gpu_model, prompts, new_tokens)
        row["cuda"] = {k: v for k, v in gpu.items() if k != "tokens"}
        row["tpot_cpu_over_cuda"] = cpu["tpot_s"] / gpu["tpot_s"]
        row["ttft_cpu_over_cuda"] = cpu["ttft_s"] / gpu["ttft_s"]
        row["greedy_tokens_identical"] = gpu["tokens"] == cpu["tokens"]
        row["first_token_mismatch"] = first_mismatch(cpu["tokens"], gpu["tokens"])
        row["prefill_logits_max_abs_diff"] = float(
            (prefill_logits(model, prompts[0]) - prefill_logits(gpu_model, prompts[0])).abs().max())
        row["cuda_max_memory_gb"] = torch.cuda.max_memory_allocated(cuda) / 1024**3
        del gpu_model
        torch.cuda.empty_cache()
    row["seconds"] = time.perf_counter() - start
    return row


def first_mismatch(want: list[list[int]], got: list[list[int]]) -> dict | None:
    for seq, (a, b) in enumerate(zip(want, got, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return {"sequence": seq, "index": i, "cpu": x, "cuda": y}
    return None


# -- main -------------------------------------------------------------------------------------------


def environment() -> dict:
    cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": cuda, "host": platform.node(), "nvml_gpus": resources.gpus()}
    if cuda:
        env["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mesh.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and the test log")
    ap.add_argument("--skip-tests", action="store_true", help="only the TPOT comparison")
    ap.add_argument("--presets", default=None,
                    help=f"comma-separated, of {', '.join(PRESETS)} or synth:PRESET[:LAYERS] "
                         "(default: bundled and realistic with CUDA, bundled without)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tests-timeout-s", type=float, default=420.0)
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    cuda = resolve_device("cuda") if env["cuda_available"] else None
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 on both sides of the comparison
    report: dict = {"environment": env, "started_at": time.time()}
    path = out / "gpu_check.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))

    print(f"[gpu_check] torch {env['torch']}, cuda {'available: ' + ', '.join(env.get('cuda_devices', [])) if cuda else 'unavailable'}",
          file=sys.stderr, flush=True)
    if not args.skip_tests:
        report["tests"] = run_tests(out, args.tests_timeout_s)
        t = report["tests"]
        print(f"[gpu_check] tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
              f"{t['skipped']} skipped, {t['xfailed']} xfailed ({t['seconds']:.0f} s)", file=sys.stderr, flush=True)
        save()
    presets = args.presets.split(",") if args.presets else (list(PRESETS) if cuda else ["bundled"])
    report["tpot"] = []
    for name in presets:
        try:
            row = compare(name.strip(), cuda, args.batch, args.prompt_tokens, args.new_tokens)
        except Exception as exc:  # one preset failing (e.g. out of memory) still writes the others
            row = {"preset": name, "error": f"{type(exc).__name__}: {exc}"}
        report["tpot"].append(row)
        if "error" in row:
            print(f"[gpu_check] {name}: {row['error']}", file=sys.stderr, flush=True)
        else:
            gpu = row["cuda"]
            print(f"[gpu_check] {name}: TPOT cpu {row['cpu']['tpot_s'] * 1e3:.2f} ms"
                  + (f", cuda {gpu['tpot_s'] * 1e3:.2f} ms (x{row['tpot_cpu_over_cuda']:.1f}), tokens identical: "
                     f"{row['greedy_tokens_identical']}" if gpu else " (cuda unavailable)"),
                  file=sys.stderr, flush=True)
        save()
    report["finished_at"] = time.time()
    save()
    print(f"[gpu_check] wrote {path}", file=sys.stderr)
    tests = report.get("tests")
    return 0 if tests is None or tests["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
