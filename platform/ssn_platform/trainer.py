"""The one Ray Train setup of the platform: `build_trainer` for the train job and every Tune trial, and a torch
process group whose listeners bind to the node's address.

Why a process group of our own. Ray Train's `TorchConfig` starts torch.distributed with `init_method="env://"`:
rank 0's `TCPStore` (the rendezvous every rank dials) then listens on all interfaces (`*:<port>`), whatever address
the node has, so a worker on a laptop or a shared cluster node accepts rendezvous traffic from any network it is
attached to. `NodeBoundTorchConfig` keeps everything else of Ray's torch backend and replaces only the start:

1. rank 0 opens a listening socket on the node's Ray address (`ray.util.get_node_ip_address()`: 127.0.0.1 on the
   local stack, the pod IP on Kubernetes) and starts the `TCPStore` master on that socket (`master_listen_fd`),
   kept alive for the worker's life;
2. every rank sets `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` to the interface carrying its own node address
   (unless the user set them), so Gloo's pair listeners and NCCL's bootstrap bind there too;
3. every rank joins with `init_process_group(store=...)`: rank 0 with the master store, the others as clients.

Limits: the interface lookup is IPv4 and Linux (`SIOCGIFADDR`); elsewhere the variables stay unset and Gloo/NCCL
choose as before (their listeners bind to one interface's address, never all). The store itself always binds to
the node address.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

import ray
import ray.train
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from ssn_platform.jobconfig import JobConfig
from ssn_platform.services import storage_filesystem

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915
_MASTER_STORE: Any = None  # rank 0's TCPStore master (and its socket): lives as long as the worker process


def interface_for(address: str) -> str | None:
    """The name of the network interface whose IPv4 address is `address`, or None (not found, not Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def _start_store(world_size: int, timeout_s: int) -> tuple[str, int]:
    """Rank 0: the rendezvous store's master, listening on the node's address only. Returns (address, port)."""
    global _MASTER_STORE
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(max(128, world_size))
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        address,
        port,
        world_size,
        True,
        datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
    )
    _MASTER_STORE = (store, listener)
    return address, port


def _join_process_group(
    backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: int
) -> None:
    """Every rank: pins Gloo/NCCL to the node's interface and joins the process group through the store."""
    interface = interface_for(ray.util.get_node_ip_address())
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    if "nccl" in backend:
        # as Ray's own setup: fail, rather than hang, when a collective times out
        if "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = _MASTER_STORE[0]
    else:
        store = dist.TCPStore(address, port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _NodeBoundTorchBackend(_TorchBackend):
    """Ray's torch backend with a start whose listeners bind to the node's address (module docstring)."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        if backend_config.backend is not None:
            backend = backend_config.backend
        else:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        world_size = len(worker_group)
        address, port = worker_group.execute_single(
            0, _start_store, world_size=world_size, timeout_s=backend_config.timeout_s
        )
        # LOCAL_RANK, RANK, WORLD_SIZE, ...: what Ray's start sets before joining (Train V2 sets them here)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=world_size,
                    address=address,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world_size)
            ]
        )


class NodeBoundTorchConfig(TorchConfig):
    """`TorchConfig` whose process group listens on the node's address, never on all interfaces."""

    @property
    def backend_cls(self):
        return _NodeBoundTorchBackend


def build_trainer(
    job: JobConfig,
    train_loop,
    *,
    mlflow_run_id: str,
    name: str,
    storage_path: str,
    num_to_keep: int,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    """The `TorchTrainer` of one training run (train job or Tune trial): `job`'s scaling and failure budget,
    checkpoints under `storage_path` on the platform's S3 filesystem, the node-bound process group."""
    scaling = job.scaling
    return TorchTrainer(
        train_loop,
        train_loop_config={"job": job.to_dict(), "mlflow_run_id": mlflow_run_id},
        torch_config=NodeBoundTorchConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem(),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=list(callbacks),
        ),
    )
