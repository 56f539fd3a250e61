"""A mesh client that runs inside a test's network namespace and takes orders on stdin.

    ip netns exec NS python -m tests.mesh.netns_client --config launch.toml [--address tcp://...]

One JSON object per line in, one per line out (so the test process, in the root namespace,
never sends a packet to a namespace's address: this process does, from inside):

    {"op": "connect", "address": "tcp://..."}          -> {} (the mesh's client address, unless
                                                          --address gave it: start this early)
    {"op": "status"}                                   -> {"status": {...}}
    {"op": "generate", "prompts": [[ids]], "n": 12}    -> {"results": [[ids] | {"error": ...}]}
    {"op": "begin", "prompts": [[ids]], "n": 40, "first": 3}
        start one stream per prompt, take `first` tokens of each  -> {"status": {...}}
    {"op": "finish", "hang_s": 60}
        finish the begun streams     -> {"results": [...], "seconds": [...], "done_at": [...]}
        (per stream: its token ids, {"error": TypeName, "message": ...} for a typed MeshError,
        or {"error": "hang"} when it was still open after hang_s; the seconds since begin when
        it was read to the end; when the coordinator finished it, its wall clock, or None)
    {"op": "quit"}

Each stream has its own MeshClient (its own connection), as separate users would. Clients
are made with MeshClient.from_config, so CURVE applies as launch.toml's [security] says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from mesh.client import MeshClient
from mesh.config import load_config
from mesh.errors import MeshError


class Driver:
    def __init__(self, address: str, config) -> None:
        self.address, self.config = address, config
        self.streams: list[tuple[MeshClient, object, object, list[int] | dict]] = []  # client, stream, iterator, tokens
        self.begun_at = 0.0

    def client(self) -> MeshClient:
        return MeshClient.from_config(self.address, self.config, timeout_s=120)

    async def status(self) -> dict:
        async with self.client() as client:
            return await client.status()

    async def _one(self, ids: list[int], n: int) -> list[int] | dict:
        try:
            async with self.client() as client:
                gen = client.generate("", prompt_ids=ids, max_new_tokens=n, stop_at_eos=False)
                return [t.token_id async for t in gen]
        except MeshError as exc:
            return {"error": type(exc).__name__, "message": str(exc)}

    async def begin(self, prompts: list[list[int]], n: int, first: int) -> None:
        self.begun_at = time.monotonic()
        for ids in prompts:
            client = self.client()
            await client.__aenter__()
            stream = client.generate("", prompt_ids=ids, max_new_tokens=n, stop_at_eos=False)
            gen = stream.__aiter__()
            got: list[int] | dict = []
            try:
                for _ in range(first):
                    got.append((await gen.__anext__()).token_id)
            except MeshError as exc:
                got = {"error": type(exc).__name__, "message": str(exc)}
            self.streams.append((client, stream, gen, got))

    async def finish(self, hang_s: float) -> tuple[list, list]:
        async def rest(client, stream, gen, got):
            try:
                done_at = None
                if isinstance(got, list):
                    try:
                        got += [t.token_id async for t in gen]
                        done_at = stream.done.record.get("done_at") if stream.done is not None else None
                    except MeshError as exc:
                        got = {"error": type(exc).__name__, "message": str(exc)}
                return got, time.monotonic() - self.begun_at, done_at
            finally:
                await client.__aexit__(None, None, None)

        async def bounded(stream):
            try:
                return await asyncio.wait_for(rest(*stream), hang_s)
            except TimeoutError:
                return {"error": "hang"}, hang_s, None

        done = await asyncio.gather(*(bounded(s) for s in self.streams))
        self.streams = []
        return [r for r, _, _ in done], [round(s, 3) for _, s, _ in done], [d for _, _, d in done]


async def serve(address: str, config) -> None:
    driver = Driver(address, config)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        order = json.loads(line)
        op = order["op"]
        try:
            if op == "quit":
                return
            if op == "connect":
                driver.address = order["address"]
                out = {}
            elif op == "status":
                out = {"status": await driver.status()}
            elif op == "generate":
                out = {"results": await asyncio.gather(*(driver._one(p, order["n"]) for p in order["prompts"]))}
            elif op == "begin":
                await driver.begin(order["prompts"], order["n"], order.get("first", 3))
                out = {"status": await driver.status()}
            elif op == "finish":
                results, seconds, done_at = await driver.finish(order.get("hang_s", 60.0))
                out = {"results": results, "seconds": seconds, "done_at": done_at}
            else:
                out = {"failed": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            out = {"failed": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--address", default="", help="the mesh's client address (or send a connect order)")
    args = ap.parse_args()
    from pathlib import Path

    asyncio.run(serve(args.address, load_config(Path(args.config), {})))


if __name__ == "__main__":
    main()
