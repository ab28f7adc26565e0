"""Where a training step's time goes, and what one gradient allreduce costs.

Two small measurements that explain the Ray-vs-plain per-epoch ratio without a profiler
(py-spy is not installed): a step split into batch gather / forward / backward /
optimizer with 1 and 2 torch threads, and the gloo allreduce of a gradient-sized tensor
between two local processes — what DDP adds to every step of a 2-worker run.
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain import model as model_lib


def step_breakdown(threads: int, batch: int, steps: int = 20, warmup: int = 3) -> dict:
    """Median milliseconds of each part of our training step at ``batch`` samples."""
    torch.set_num_threads(threads)
    cfg = model_lib.model_config()
    net = model_lib.build_model(cfg)
    optimizer, loss_fn = model_lib.make_optimizer(net, cfg), model_lib.loss_function(cfg)
    images, labels = torch.randn(60000 // 10, 1, 28, 28), torch.randint(0, 10, (60000 // 10,))
    parts: dict[str, list[float]] = {"gather": [], "forward": [], "backward": [], "optimizer": []}
    for step in range(warmup + steps):
        marks = [time.perf_counter()]
        index = torch.randint(0, len(images), (batch,))
        x, y = images[index], labels[index]
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if step >= warmup:
            for name, start, end in zip(parts, marks, marks[1:], strict=False):
                parts[name].append((end - start) * 1000)
    result = {name: round(statistics.median(values), 2) for name, values in parts.items()}
    result["total"] = round(sum(result.values()), 2)
    return {"threads": threads, "batch": batch, "ms": result}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _allreduce_worker(rank: int, world: int, port: int, numel: int, repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tensor = torch.randn(numel)
    timings = []
    for i in range(repeats + 3):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        if i >= 3:
            timings.append((time.perf_counter() - started) * 1000)
    if rank == 0:
        out.put(statistics.median(timings))
    dist.destroy_process_group()


def allreduce_ms(numel: int, world: int = 2, repeats: int = 30) -> float:
    """Median milliseconds of one gloo allreduce of ``numel`` float32 over ``world``
    local processes (one thread each, like our Ray workers)."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    procs = [context.Process(target=_allreduce_worker, args=(rank, world, port, numel, repeats, queue))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    return round(queue.get(), 3) if not queue.empty() else float("nan")


def profile(global_batch: int = 256) -> dict:
    """Both measurements for our recipe: one process with 2 threads at the global batch,
    and one of two single-thread workers at half the batch, plus its allreduce."""
    numel = sum(p.numel() for p in model_lib.build_model().parameters())
    threads = os.cpu_count() or 1
    result = {"parameters": numel,
              "plain_step": step_breakdown(threads, global_batch),
              "ray2_worker_step": step_breakdown(1, global_batch // 2),
              "allreduce_ms_2_workers": allreduce_ms(numel, 2)}
    torch.set_num_threads(threads)
    return result
