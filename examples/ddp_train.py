"""Data-parallel training of the colored-digits model with a synchronised RegBN.

The two-branch classifier of ``pmr_colored_digits.py`` is patched by ``regbn.insert``, its RegBN
layers are made synchronous with ``regbn.convert_sync_regbn`` (λ⁺, W and the input
normalisation are computed over the global batch of all ranks), and the whole model is wrapped
in ``DistributedDataParallel``. On the CPU it runs with gloo:

    torchrun --nproc_per_node=2 examples/ddp_train.py --quick
    torchrun --nproc_per_node=2 examples/ddp_train.py --epochs 5 --backend nccl   # on 2 GPUs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from colored_digits import build_colored_digits  # noqa: E402
from pmr_colored_digits import build_model, standardise  # noqa: E402

import regbn  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=50, help="global batch, split over ranks")
    p.add_argument("--placement", choices=["input", "late"], default="late")
    p.add_argument("--backend", default=None, help="gloo (default on CPU) or nccl")
    p.add_argument("--quick", action="store_true", help="a few hundred samples, one epoch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # one core per rank

    data = standardise(build_colored_digits())
    n_train = 400 if args.quick else len(data["train_labels"])
    epochs = 1 if args.quick else args.epochs
    train = TensorDataset(
        data["train_gray"][:n_train],
        data["train_colored"][:n_train],
        data["train_labels"][:n_train],
    )
    per_rank = max(2, args.batch_size // world)
    sampler = DistributedSampler(
        train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True
    )
    loader = DataLoader(train, batch_size=per_rank, sampler=sampler, drop_last=True)

    example = (data["train_gray"][:per_rank], data["train_colored"][:per_rank])
    model = build_model(f"regbn-{args.placement}", seed=0, example_inputs=example)
    model = regbn.convert_sync_regbn(model).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total, count = torch.zeros(2, device=device), 0
        for gray, colored, y in loader:
            gray, colored, y = gray.to(device), colored.to(device), y.to(device)
            _, _, logits = ddp(gray, colored)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach() * len(y), torch.tensor(len(y), device=device)])
            count += 1
        dist.all_reduce(total)
        lam = [m.last_lambda for m in model.modules() if isinstance(m, regbn.RegBN)]
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{epochs}: train loss {float(total[0] / total[1]):.4f} "
                f"over {int(total[1])} samples on {world} ranks ({count} steps each); "
                f"last lambda+ {lam[0]:.4g}",
                flush=True,
            )

    ddp.eval()
    with torch.no_grad():
        test_gray = data["test_gray"][rank::world].to(device)
        test_col = data["test_colored"][rank::world].to(device)
        test_y = data["test_labels"][rank::world].to(device)
        correct = (ddp(test_gray, test_col)[2].argmax(1) == test_y).sum()
        stats = torch.stack([correct, torch.tensor(len(test_y), device=device)]).double()
        dist.all_reduce(stats)
    # every rank holds the same running W: the synchronised layers never diverge
    W = next(m for m in model.modules() if isinstance(m, regbn.RegBN)).W
    Ws = [torch.empty_like(W) for _ in range(world)]
    dist.all_gather(Ws, W)
    same = all(torch.equal(Ws[0], w) for w in Ws)
    if rank == 0:
        print(
            f"test accuracy {float(stats[0] / stats[1]):.3f}; running W identical on all "
            f"ranks: {same}",
            flush=True,
        )
    # Every rank past its last collective, and DDP's reducer gone, before the group is torn
    # down: otherwise a rank can abort at exit ("terminate called without an active exception").
    dist.barrier()
    del ddp, opt
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
