"""The coordinator's side of the node-daemon control protocol, in the pieces every process that
plays the coordinator uses: the coordinator itself (mesh/coordinator.py, asyncio) and
`moemesh profile` (mesh/profiling/node.py, a thread). The node's side is nodes/daemon.py.

    bind_control(context, config, host, port)  the control ROUTER, bound the mesh's way
    register_ack(node, config)                 the answer to a NodeRegister
    spawn_request(instance_id, ..., config)    the SpawnFunction that starts one function instance

So a profiled function instance is asked for, limited and started exactly as a served one
(CPU share = memory_gb / gb_per_vcpu, the configured spawn path, keep-alive and start delay),
and the profiler's control socket gets the same limits, CURVE and hand-over as the mesh's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import zmq

from mesh.config import MeshConfig
from mesh.protocol import RegisterAck, SpawnFunction
from mesh.sockets import harden


def bind_control(context: zmq.Context, config: MeshConfig, host: str = "127.0.0.1",
                 port: int = 0) -> tuple[zmq.Socket, str]:
    """A ROUTER for node daemons bound on host:port (0: a free one): (socket, endpoint read back).

    The "control" role's limits and CURVE (mesh.sockets.harden), linger 0, unroutable messages
    dropped (ROUTER_MANDATORY off), and ROUTER_HANDOVER: a daemon that reconnects under its
    node name takes over its old pipe instead of being ignored until that one is noticed gone.
    Works for a zmq.Context and a zmq.asyncio.Context alike."""
    endpoint = f"tcp://{host}:{port}"
    sock = context.socket(zmq.ROUTER)
    harden(sock, "control", config, bind=endpoint)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.bind(endpoint)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def register_ack(node: str, config: MeshConfig) -> RegisterAck:
    """Registered: heartbeat every [coordinator] heartbeat_s, dead after `liveness` silent ones."""
    c = config.coordinator
    return RegisterAck(node_id=node, heartbeat_interval_s=c.heartbeat_s, liveness=c.liveness)


def spawn_request(instance_id: str, function_id: str, experts: Iterable[tuple[int, int]], memory_gb: float,
                  config: MeshConfig, model_path: str | Path, node_kind: str = "cpu",
                  keep_alive_s: float | None = None) -> SpawnFunction:
    """Start one instance of a function holding `experts` ([(layer, expert), ...]) in memory_gb.

    Its CPU share is memory_gb / [functions] gb_per_vcpu; keep-alive, spawn path ("zygote" or
    "fresh") and start delay come from [functions] (keep_alive_s: this instance's own, e.g. an
    adaptive keep-alive's decision); on a node of kind "gpu" its experts compute on that node's GPU."""
    f = config.functions
    return SpawnFunction(instance_id=instance_id, function_id=function_id,
                         experts=[tuple(e) for e in experts], memory_gb=memory_gb,
                         cpu_share=memory_gb / f.gb_per_vcpu,
                         keep_alive_s=f.keep_alive_s if keep_alive_s is None else keep_alive_s,
                         spawn=f.spawn, model_path=str(model_path), start_delay_s=f.start_delay_s,
                         device="cuda" if node_kind == "gpu" else "cpu")
