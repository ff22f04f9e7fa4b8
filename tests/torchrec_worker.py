"""Run under torchrun (gloo): a torchrec DLRM whose tables are a CompressedEmbeddingBagCollection, wrapped in
DistributedModelParallel, trains on each rank's half of every batch; after every step the ranks' parameters and
adaptive state are compared, and the worker exits non-zero if they differ. Rank 0 writes the losses and the final
state to OUT/<method>.pt.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/torchrec_worker.py OUT METHOD...
"""

import sys

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compemb import distributed
from compemb.integrations.torchrec import CompressedEmbeddingBagCollection

STEPS, BATCH, DIM = 30, 64, 8
SIZES = [200, 800, 50]


def batch(step: int) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """Global batch ``step``: a click that depends on a dense value and f0's id; f1, f2 bags of 0-3 ids."""
    generator = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 4, (len(SIZES), BATCH), generator=generator)
    lengths[0] = 1  # feature f0 one-hot
    values = [torch.randint(0, n, (int(lengths[f].sum()),), generator=generator) for f, n in enumerate(SIZES)]
    dense = torch.randn(BATCH, 4, generator=generator)
    labels = (dense[:, 0] + 2.0 * (values[0] % 2) - 1 > 0).float()
    return (
        dense,
        KeyedJaggedTensor.from_lengths_sync(
            [f"f{f}" for f in range(len(SIZES))], torch.cat(values), lengths.reshape(-1)
        ),
        labels,
    )


def rank_slice(dense, kjt, labels, rank, world):
    rows = BATCH // world
    keep = slice(rank * rows, (rank + 1) * rows)
    lookup = kjt.to_dict()
    values = [lookup[k].to_padded_dense(padding_value=-1)[keep] for k in kjt.keys()]
    lengths = [(v >= 0).sum(1) for v in values]
    flat = [v[v >= 0] for v in values]
    part = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(flat), torch.cat(lengths))
    return dense[keep], part, labels[keep]


def state(model) -> torch.Tensor:
    tensors = [t.detach().double().flatten() for t in model.state_dict().values() if torch.is_tensor(t)]
    return torch.cat(tensors)


def main() -> None:
    out, methods = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for method in methods:
        tables = [
            EmbeddingBagConfig(name=f"t{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f"f{f}"])
            for f, n in enumerate(SIZES)
        ]
        collection = CompressedEmbeddingBagCollection(tables, method=method, compression=4, seed=5)
        torch.manual_seed(0)
        model = DLRM(
            embedding_bag_collection=collection,
            dense_in_features=4,
            dense_arch_layer_sizes=[16, DIM],
            over_arch_layer_sizes=[16, 1],
        )
        dmp = DistributedModelParallel(model, device=torch.device("cpu"))
        # DMP wraps the model it was given (no copy): the hooks below reach the tables it trains
        assert dmp.module.sparse_arch.embedding_bag_collection is collection
        assert isinstance(dmp._dmp_wrapped_module, torch.nn.parallel.DistributedDataParallel)  # no sharder: DDP
        optimizer = torch.optim.Adagrad(dmp.parameters(), lr=0.1)
        collection.on_train_begin(STEPS)
        losses = []
        for step in range(STEPS):
            dense, kjt, labels = rank_slice(*batch(step), rank, world)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(dense, kjt).squeeze(-1), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            collection.on_step_end(step, optimizer)
            mine = state(collection)
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
                print(f"{method}: ranks differ after step {step}", file=sys.stderr)
                sys.exit(1)
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / world)
        if rank == 0:
            torch.save({"losses": losses, "state": collection.state_dict()}, f"{out}/{method}.pt")
    distributed.exit_rank(0)  # without the teardown of DMP's DDP, which can deadlock in gloo


if __name__ == "__main__":
    main()
