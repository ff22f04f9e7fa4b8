"""mch: TorchRec's managed collisions as a baseline (a zero-collision table, LFU eviction, a shared default row)."""

import pytest
import torch

from compemb import make_embedding

pytest.importorskip("torchrec")


def _train(module, batches, lr=0.1):
    optimizer = torch.optim.Adagrad(module.parameters(), lr=lr)
    for step, ids in enumerate(batches):
        optimizer.zero_grad()
        module(ids).square().sum().backward()
        optimizer.step()
        module.on_step_end(step, optimizer)
    return optimizer


def test_frequent_ids_get_slots_of_their_own_and_the_rest_share_the_last_row():
    # 10 slots: 8 floats and 3 int64 each (56 bytes), and TorchRec's int64 iteration counter: 568 bytes
    module = make_embedding("mch", 10_000, 8, num_params=568 // 4)
    assert module.zch_size == 10 and module.memory().total == 568
    untrained = module.rows_of(torch.tensor([1, 2, 3]))
    assert untrained.tolist() == [9, 9, 9]  # nobody resident yet: TorchRec's default row
    frequent = torch.arange(100, 105)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.cat([frequent.repeat(20), torch.randint(1_000, 10_000, (30,), generator=generator)]) for _ in range(5)
    ]
    _train(module, batches)
    rows = module.rows_of(frequent)
    assert len(set(rows.tolist())) == 5 and (rows < 9).all()  # each frequent id its own slot
    assert module.rows_of(torch.tensor([9_999])).item() == 9  # never seen: the default row


def test_an_id_taking_a_slot_starts_from_a_fresh_row_and_fresh_optimizer_state():
    module = make_embedding("mch", 10_000, 8, num_params=(3 * 56 + 8) // 4)  # 3 slots: 2 owned, 1 default
    # TorchRec sizes its history from the first batch (1.25 batches an eviction interval): a full-sized one first
    optimizer = _train(module, [torch.cat([torch.tensor([5, 5, 5, 6, 6, 6]), torch.arange(1_000, 1_094)])])
    owned = module.rows_of(torch.tensor([5, 6]))
    assert sorted(owned.tolist()) == [0, 1]
    # two newcomers, far more frequent: LFU evicts 5 and 6 and their rows start again from the init
    trained = module.weight.detach()[owned].clone()
    optimizer.zero_grad()
    module(torch.tensor([7] * 50 + [8] * 50)).square().sum().backward()
    optimizer.step()
    module.on_step_end(10, optimizer)
    new_rows = module.rows_of(torch.tensor([7, 8]))
    assert sorted(new_rows.tolist()) == [0, 1] and (module.rows_of(torch.tensor([5, 6])) == 2).all()
    fresh = module.weight.detach()[new_rows]
    assert not torch.equal(fresh, trained) and fresh.abs().max() <= module.init_bound
    state = optimizer.state[module.weight]["sum"]
    assert bool((state[new_rows] == 0).all())  # Adagrad's accumulator of the new owners restarts
