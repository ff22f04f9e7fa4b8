"""Fresh optimizer state for rows that change owner: a reset row trains as a parameter created at its reset."""

import pytest
import torch

from compemb.embeddings.adaptive import ROW_STEP_KEY, reset_optimizer_rows, track_row_steps
from compemb.optim import RowAdagrad, RowAdam

# the Trainer's optimizers are sgd (torch's SGD), adagrad (RowAdagrad), adam (RowAdam) and adam_dense (torch's Adam)
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "amsgrad": lambda params: torch.optim.Adam(params, lr=0.01, amsgrad=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "sgd-plain": lambda params: torch.optim.SGD(params, lr=0.05),
    "row-adam": lambda params: RowAdam(params, lr=0.01),
    "row-adagrad": lambda params: RowAdagrad(params, lr=0.05),
    "sparse-adam": lambda params: torch.optim.SparseAdam(params, lr=0.01),
}
# every optimizer takes dense gradients; these also take sparse ones (torch's Adam and momentum SGD refuse them)
SPARSE = ("adagrad", "sgd-plain", "row-adam", "row-adagrad", "sparse-adam")
SPARSE_ONLY = ("sparse-adam",)  # torch's SparseAdam refuses dense gradients
CASES = [(name, "dense") for name in sorted(OPTIMIZERS) if name not in SPARSE_ONLY] + [
    (name, "sparse") for name in SPARSE
]


def as_gradient(grad, kind):
    """``grad`` as it comes to a table: dense, or sparse naming every row (an embedding with sparse=True)."""
    if kind == "dense":
        return grad.clone()
    return torch.sparse_coo_tensor(torch.arange(grad.shape[0]).unsqueeze(0), grad.clone(), grad.shape)


def gradients(steps, rows, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    # gradients of a consistent sign and scale, so that Adam's moments grow large before the reset
    return [torch.randn(rows, dim, generator=generator) * 0.1 + 1.0 for _ in range(steps)]


@pytest.mark.parametrize("name, kind", CASES)
def test_reset_row_trains_as_a_fresh_parameter(name, kind):
    rows, dim, reset = 6, 3, torch.tensor([1, 4])
    weight = torch.nn.Parameter(torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)))
    optimizer = OPTIMIZERS[name]([weight])
    before, after = gradients(300, rows, dim, seed=1), gradients(30, rows, dim, seed=2)
    for grad in before:
        weight.grad = as_gradient(grad, kind)
        optimizer.step()
    reset_optimizer_rows(optimizer, weight, reset)
    # the slow reference: the reset rows as a new parameter with a new optimizer from the reset on
    fresh = torch.nn.Parameter(weight.detach()[reset].clone())
    reference = OPTIMIZERS[name]([fresh])
    start = weight.detach()[reset].clone()
    for step, grad in enumerate(after):
        weight.grad = as_gradient(grad, kind)
        optimizer.step()
        fresh.grad = as_gradient(grad[reset], kind)
        reference.step()
        if step == 0:  # the first update: no larger than a new parameter's at the same learning rate
            moved = (weight.detach()[reset] - start).abs().max()
            assert moved <= (fresh.detach() - start).abs().max() * (1 + 1e-5)
    torch.testing.assert_close(weight.detach()[reset], fresh.detach(), rtol=1e-5, atol=1e-6)


def test_adam_without_the_correction_overshoots():
    """The defect the rule fixes: a zeroed row at a late shared step moves ~3x the learning rate (sqrt(1 - b2) / (1 - b1) = 3.2)."""
    weight = torch.nn.Parameter(torch.zeros(2, 1))
    optimizer = torch.optim.Adam([weight], lr=0.01)
    for _ in range(3000):  # late in a run: Adam's shared bias corrections are ~1
        weight.grad = torch.ones(2, 1)
        optimizer.step()
    state = optimizer.state[weight]
    state["exp_avg"][0] = state["exp_avg_sq"][0] = 0  # a plain zeroing of row 0 (the old rule)
    reset_optimizer_rows(optimizer, weight, torch.tensor([1]))  # the rule, on row 1
    start = weight.detach().clone()
    weight.grad = torch.ones(2, 1)
    optimizer.step()
    moved = (start - weight.detach()).squeeze(-1)
    assert moved[0] > 2.5 * 0.01
    assert moved[1] == pytest.approx(0.01, rel=1e-4)


def test_row_steps_survive_an_optimizer_checkpoint():
    rows, dim = 4, 2
    weights = [torch.nn.Parameter(torch.ones(rows, dim)) for _ in range(2)]
    optimizers = [torch.optim.Adam([w], lr=0.01) for w in weights]
    grads = gradients(100, rows, dim, seed=3)
    for grad in grads[:50]:
        for weight, optimizer in zip(weights, optimizers):
            weight.grad = grad.clone()
            optimizer.step()
    for weight, optimizer in zip(weights, optimizers):
        reset_optimizer_rows(optimizer, weight, torch.tensor([2]))
    # the second run is rebuilt from a checkpoint: a new optimizer, its state loaded, the hook installed again
    restored = torch.optim.Adam([weights[1]], lr=0.01)
    restored.load_state_dict(optimizers[1].state_dict())
    track_row_steps(restored)
    assert ROW_STEP_KEY in restored.state[weights[1]]
    for grad in grads[50:]:
        for weight, optimizer in zip(weights, (optimizers[0], restored)):
            weight.grad = grad.clone()
            optimizer.step()
    torch.testing.assert_close(weights[0], weights[1])


# --- reads without side effects ------------------------------------------------------------------------------


def _plain_steps(module, batches, read):
    """A plain loop (no on_step_end); ``read(module)`` runs between backward and step, and after the step."""
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    head = torch.linspace(-1, 1, module.embedding_dim)
    for ids in batches:
        loss = (module(ids) @ head - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        read(module)
        optimizer.step()
        read(module)
    return module


def _state_reads(module):
    module.state_dict()
    module.eval()
    module(torch.arange(50))  # an eval-mode forward must not apply what is pending either
    module.train()


@pytest.mark.parametrize(
    "name, options",
    [
        ("cafe", dict(threshold=2)),
        ("cafe-ml", dict(threshold=2)),
        ("adaembed", dict(interval=3)),
        ("cce", dict(importance="gradient", cluster_every=4)),
    ],
)
def test_state_dict_and_eval_forwards_change_nothing(name, options):
    from compemb import make_embedding

    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 2000, (256,), generator=generator) ** 2 % 2000 for _ in range(12)]
    built = [make_embedding(name, 2000, 8, compression=4, seed=1, **options) for _ in range(2)]
    quiet = _plain_steps(built[0], batches, lambda m: None)
    read = _plain_steps(built[1], batches, _state_reads)
    for (key, a), b in zip(quiet.state_dict().items(), read.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(quiet(batches[0]), read(batches[0]))


def test_a_state_dict_with_updates_pending_holds_them_and_leaves_them_pending():
    from compemb import make_embedding

    module = make_embedding("cafe", 2000, 8, compression=4, seed=1, threshold=1, importance="frequency")
    head = torch.linspace(-1, 1, 8)
    (module(torch.tensor([7] * 64)) @ head).sum().backward()  # id 7 becomes hot when this is applied
    saved = module.state_dict()
    assert not bool(module.owned.any())  # the read applied nothing to the module itself
    assert bool(saved["owned"].any())  # the checkpoint holds what the next forward will apply
    module(torch.tensor([1]))  # the next training forward applies it
    assert torch.equal(module.owned, saved["owned"])


def test_sparse_adam_reset_rows_count_their_own_updates_when_touched_lazily():
    """SparseAdam moves only the rows a step touches: a reset row touched every other step trains as a fresh
    SparseAdam parameter that took part in just those steps (the slow reference), first update included (was 3.08x)."""
    rows, dim, reset = 6, 2, torch.tensor([1, 4])
    weight = torch.nn.Parameter(torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)))
    optimizer = torch.optim.SparseAdam([weight], lr=0.01)
    for grad in gradients(300, rows, dim, seed=1):
        weight.grad = as_gradient(grad, "sparse")
        optimizer.step()
    reset_optimizer_rows(optimizer, weight, reset)
    fresh = torch.nn.Parameter(weight.detach()[reset].clone())
    reference = torch.optim.SparseAdam([fresh], lr=0.01)
    start = weight.detach()[reset].clone()
    for step, grad in enumerate(gradients(20, rows, dim, seed=2)):
        touched = torch.tensor([0, 2, 3, 5]) if step % 2 == 0 else torch.arange(rows)  # the reset rows every other step
        weight.grad = torch.sparse_coo_tensor(touched.unsqueeze(0), grad[touched], grad.shape)
        optimizer.step()
        if step % 2 == 1:
            fresh.grad = as_gradient(grad[reset], "sparse")
            reference.step()
        if step == 1:  # the first update of the reset rows: the learning rate, as a new parameter's
            assert (weight.detach()[reset] - start).abs().max() == pytest.approx(0.01, rel=1e-3)
    torch.testing.assert_close(weight.detach()[reset], fresh.detach(), rtol=1e-5, atol=1e-6)
