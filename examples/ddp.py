"""Guard DistributedDataParallel (or FSDP) training: every rank keeps the same ledger.

Starts ``--world`` CPU processes (gloo on 127.0.0.1) that train an MLP on scikit-learn's
embedded digits with ``DistributedDataParallel`` (or, with ``--fsdp``, sharded by FSDP2's
``fully_shard``) and a ``DistributedSampler``, under ``gradguard.GradGuard``. The loop is
the usual DDP loop; gradguard only wraps it. Each
rank measures GNQ over its own batch (``--gnq local``: an upper bound of the global-batch
GNQ) or over the global batch (``--gnq global``: exact, gathers per-example gradients);
the ranks then share indices, GNQ and policy weights, so their ledgers are identical and
they agree on every drop. Rank 0 alone writes TensorBoard logs to ``runs/ddp``.

At the end every rank checks that all ledgers are bit-for-bit equal, and rank 0 prints
the most-disclosing examples.

Needs the extra ``experiments`` (scikit-learn's digits); from this checkout:
    pip install -e ".[experiments]"
Run:  python examples/ddp.py [--world 2] [--policy drop] [--gnq local] [--epochs 4] [--fsdp]
"""

from __future__ import annotations

import argparse
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import gradguard as gg
from gradguard.experiments.data import load_dataset
from gradguard.experiments.models import mlp
from gradguard.formatting import format_run_summary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world)
    try:
        split = load_dataset("digits", seed=0)
        torch.manual_seed(0)  # the same initial model on every rank
        model = mlp(split.input_shape, split.num_classes)
        if args.fsdp:  # parameters and gradients sharded across the ranks
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sampler = DistributedSampler(split.train, shuffle=True, seed=0)
        loader = DataLoader(split.train, batch_size=args.batch_size, sampler=sampler)
        loss_fn = nn.CrossEntropyLoss()

        policy = dict(policy="drop", threshold=gg.Quantile(0.95)) if args.policy == "drop" \
            else dict(policy="monitor")
        guard = gg.GradGuard(**policy, distributed_gnq=args.gnq, log_dir=args.log_dir)
        model, optimizer, loader = guard.make_guarded(module=model, optimizer=optimizer,
                                                      data_loader=loader)
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()

        # Every rank's ledger must be the same: compare a checksum of each field.
        checksum = torch.stack([t.double().sum() for t in guard.ledger.state_dict().values()])
        all_sums = [torch.zeros_like(checksum) for _ in range(args.world)]
        dist.all_gather(all_sums, checksum)
        agree = all(torch.equal(s, all_sums[0]) for s in all_sums)
        if rank == 0:
            s = guard.summary()
            print(f"{args.world} ranks ({'FSDP' if args.fsdp else 'DDP'}), {guard.step} "
                  "steps, GNQ over the "
                  f"{args.gnq} batch; ledgers identical on every rank: {agree}")
            print(format_run_summary(s, log_dir=args.log_dir))
            print(guard.ledger.top(5))
        guard.close()
        # Leave together: a rank tearing down gloo while its peer still writes can abort.
        dist.barrier()
        if not agree:
            raise SystemExit("ledgers differ across ranks")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--policy", choices=("monitor", "drop"), default="drop")
    parser.add_argument("--gnq", choices=("local", "global"), default="local")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--fsdp", action="store_true", help="shard with fully_shard")
    parser.add_argument("--log-dir", default="runs/ddp")
    args = parser.parse_args()
    mp.spawn(train, args=(args, _free_port()), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
