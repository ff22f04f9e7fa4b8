"""Run under torchrun by tests/test_distributed.py: train each method step by step and check, after every step,
that every rank holds exactly the same parameters and buffers (then rank 0's checkpoint is compared with a
one-process run by the test).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py DATA OUT METHOD...
"""

import sys

import torch

from compemb import distributed
from compemb.train import TrainConfig, Trainer


def config(data: str, out: str, method: str) -> TrainConfig:
    """The run both the test and this worker train (the test imports it)."""
    name, _, option = method.partition(":")
    options = {"cluster_every": 5} if name.startswith("cce") else {}
    if option:
        key, value = option.split("=")
        options[key] = value
    return TrainConfig(
        data=data,
        out=out,
        method=name,
        compression=4,
        method_options=options,
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        optimizer="sgd",
        lr=0.1,
        batch_size=256,
        epochs=1,
        seed=3,
        checkpoint_minutes=0,
    )
    # SGD: Adam and Adagrad turn the last-bit differences of a near-zero gradient (sums in another order on two
    # processes) into steps of about lr, so "equal to 1e-5" is a claim only a linear update can keep; the ranks
    # themselves agree exactly with any optimizer (the CLI test trains Adam on two ranks)


def flat_state(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter and buffer, as float64 (bit patterns of floats and the ids used here survive)."""
    return torch.cat([t.detach().double().reshape(-1) for t in model.state_dict().values()])


def main() -> None:
    data, out = sys.argv[1:3]
    for method in sys.argv[3:]:
        trainer = Trainer(config(data, f"{out}/{method}", method))
        for step in range(1, trainer.total_steps + 1):
            trainer.fit(stop_at=step)
            state = flat_state(trainer.model)
            every = distributed.gather_rows(state.unsqueeze(0))
            if not all(torch.equal(every[0], other) for other in every[1:]):
                raise SystemExit(f"{method}: the ranks differ after step {step}")
    distributed.exit_rank(0)  # without the teardown that can deadlock in gloo


if __name__ == "__main__":
    main()


def average_gradients_worker(rank: int, world: int, address: str, threshold: int, out: str) -> None:
    """Spawned by the test: each rank averages its own sparse and dense gradients; rank 0 saves what it got."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    distributed.DENSE_REDUCE_FLOATS = threshold
    table, vector = torch.nn.Parameter(torch.zeros(6, 3)), torch.nn.Parameter(torch.zeros(4))
    rows = [torch.tensor([0, 2, 2]), torch.tensor([2, 5])][rank]  # row 5 is touched with a zero gradient
    values = [torch.ones(3, 3), torch.stack([torch.full((3,), 4.0), torch.zeros(3)])][rank]
    table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (6, 3))
    vector.grad = torch.full((4,), float(rank + 1))
    distributed.average_gradients([table, vector])
    if rank == 0:
        grad = table.grad.coalesce()
        torch.save({"rows": grad.indices()[0], "values": grad.values(), "vector": vector.grad}, out)
    dist.destroy_process_group()
