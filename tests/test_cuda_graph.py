"""--cuda-graph: what a CUDA graph replays must be the same work every step. No CUDA device runs here, so the step of
every method is checked on CPU, on the device code path, by :func:`compemb.cuda_graph.replay_check`: two steps after
the warm-up dispatch the same ops with the same scalar arguments, replace no state tensor and read nothing back."""

import copy
import dataclasses

import pytest
import torch

from compemb import METHODS, cuda_graph
from compemb.bench.replay import replay_check
from compemb.bench.syncs import _stepping_trainer
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.kernels import use_kernels
from compemb.optim import RowAdagrad, RowAdam
from compemb.sketch.hotsketch import HotSketch
from compemb.sketch.packed import PackedSketches
from compemb.train import TrainConfig, Trainer
from tests.cli_errors import one_line_error

REFUSED = {"adaembed": "step count it keeps on the host", "mch": "TorchRec"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph") / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 4096 + 300, "val": 512}, scale=1e-4, seed=5), progress=False)
    return str(out)


def _config(data, method, sharing="per_feature", **changes):
    compresses = METHODS[method].compresses
    settings = dict(out="unused", embedding_dim=8, bottom=(16,), top=(16,), batch_size=512, sharing=sharing)
    return TrainConfig(data=data, method=method, compression=4 if compresses else None, **{**settings, **changes})


def _stepper(config, out, prepared=True):
    """A trainer stepping through its step body as a graph would (the step number on the device), its batches read
    beforehand (reading them is the reader thread's work, not the step's)."""
    trainer, adaptive = _stepping_trainer(config, out, kernels="torch")
    if prepared:
        cuda_graph.prepare(trainer.model, trainer.optimizer)
        trainer.stepper.step_counter = torch.zeros((), dtype=torch.int64)
    batches = [trainer.prepared_batch(index) for index in range(8)]

    def step():
        trainer.stepper.body(batches[trainer.step], trainer.step, adaptive)
        trainer.step += 1

    return trainer, adaptive, step


@pytest.mark.parametrize("sharing", ["per_feature", "shared"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - set(REFUSED)))
def test_every_methods_steady_step_is_a_replay_of_the_last(data, method, sharing, tmp_path):
    trainer, adaptive, step = _stepper(_config(data, method, sharing), str(tmp_path))
    if method == "mde" and sharing == "shared":  # one table of several blocks: refused, and rightly so
        assert "counts read back" in cuda_graph.refusal(trainer.model, trainer.optimizer)
        with use_kernels("torch"):
            step()
            assert any("host reads" in problem for problem in replay_check(step, trainer.model, trainer.optimizer))
        return
    assert cuda_graph.refusal(trainer.model, trainer.optimizer) is None
    with use_kernels("torch"):
        for _ in range(cuda_graph.WARMUP_STEPS):
            step()
        assert all(module.steady_step(trainer.step + k) for module in adaptive for k in range(3))
        assert replay_check(step, trainer.model, trainer.optimizer, steps=3) == []


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_a_method_that_decides_on_the_host_is_refused_by_name(data, method, tmp_path):
    if method == "mch":
        pytest.importorskip("torchrec")
    trainer, _, _ = _stepper(_config(data, method), str(tmp_path), prepared=False)
    why = cuda_graph.refusal(trainer.model, trainer.optimizer)
    assert why is not None and REFUSED[method] in why and method in why


def test_the_check_finds_the_host_values_an_unprepared_step_would_bake_in(data, tmp_path):
    """Without prepare(): Adam's bias corrections and the sketches' decays come from host counts, and the loss
    flag from the host's step number; a replay would repeat the first step's values."""
    trainer, _, step = _stepper(_config(data, "cafe"), str(tmp_path), prepared=False)
    with use_kernels("torch"):
        for _ in range(cuda_graph.WARMUP_STEPS):
            step()
        problems = replay_check(step, trainer.model, trainer.optimizer, steps=3)
    assert problems and all("(was " in problem or "step 1 ran" in problem for problem in problems), problems


def test_a_clustering_step_is_not_steady_and_would_not_be_a_replay(data, tmp_path):
    config = _config(data, "cce-paper", method_options={"cluster_every": 5})
    trainer, adaptive, step = _stepper(config, str(tmp_path))
    steady = [all(module.steady_step(index) for module in adaptive) for index in range(8)]
    assert steady.count(False) == 1, steady  # one clustering in these steps
    with use_kernels("torch"):
        while trainer.step < steady.index(False) - 1:
            step()
        problems = replay_check(step, trainer.model, trainer.optimizer, steps=2)
    assert any("step 2" in problem for problem in problems), problems


@pytest.mark.parametrize("optimizer", [RowAdam, RowAdagrad])
def test_a_capturable_optimizer_updates_as_the_plain_one_with_counts_in_device_tensors(optimizer):
    torch.manual_seed(0)
    first = torch.nn.ModuleDict({"mlp": torch.nn.Linear(4, 3), "table": torch.nn.Embedding(20, 3, sparse=True)})
    models = [first, copy.deepcopy(first)]
    plain = optimizer(models[0].parameters(), lr=0.05)
    capturable = optimizer(models[1].parameters(), lr=0.05, capturable=True)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 4, generator=generator), torch.randint(0, 20, (8,), generator=generator)) for _ in range(6)
    ]
    index = iter(range(len(batches)))

    def step(model, chosen):
        x, ids = batches[chosen]
        chosen_optimizer = plain if model is models[0] else capturable
        chosen_optimizer.zero_grad(set_to_none=True)
        (model["mlp"](x).square().sum() + model["table"](ids).square().sum()).backward()
        chosen_optimizer.step()

    with use_kernels("torch"):
        for chosen in range(2):
            step(models[0], chosen)
            step(models[1], chosen)
        next(index), next(index)
        problems = replay_check(lambda: step(models[1], next(index)), models[1], capturable, steps=3)
        for chosen in range(2, 5):
            step(models[0], chosen)
    assert problems == []
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    counted = 0
    for mine, theirs in zip(models[1].parameters(), models[0].parameters()):
        state = capturable.state[mine]
        assert ("step" in state) == ("step" in plain.state[theirs])
        if "step" in state:  # (RowAdam's sparse table counts per row instead, in a device tensor already)
            assert isinstance(state["step"], torch.Tensor) and state["step"].device == mine.device
            assert float(state["step"]) == float(plain.state[theirs]["step"]) == 5
            counted += 1
    assert counted >= 2


def test_a_plain_adam_step_would_be_a_different_graph_every_step():
    model = torch.nn.Linear(4, 3)
    optimizer = RowAdam(model.parameters(), lr=0.05)
    x = torch.randn(8, 4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        optimizer.step()

    step()
    assert any("_foreach" in problem for problem in replay_check(step, model, optimizer))


def _sketches(mass_on_device):
    sketches = [
        HotSketch(w, 4, threshold=0.3, decay_factor=0.5, seed=seed, backend="merge")
        for w, seed in ((6, 1), (1, 2), (11, 3))
    ]
    for sketch in sketches:
        sketch.mass_on_device = mass_on_device
    return sketches


def test_sketch_masses_on_the_device_decay_exactly_as_on_the_host():
    """One sketch and packed sketches: the decay decided on the device gives the same slots, bit for bit."""
    host, device, one_host, one_device = _sketches(False), _sketches(True), _sketches(False), _sketches(True)
    packed_host, packed_device = PackedSketches(host), PackedSketches(device)
    generator = torch.Generator().manual_seed(8)
    decays = 0
    with use_kernels("torch"):
        for _ in range(12):
            ids = torch.randint(0, 40, (32, 3), generator=generator)
            scores = torch.rand(32, 3, generator=generator)
            decays += sum(packed_host.insert(ids, scores, masses=[32.0] * 3))
            assert packed_device.insert(ids, scores, masses=[32.0] * 3) == [-1] * 3
            for t in range(3):
                one_host[t].insert(ids[:, t].contiguous(), None, mass=32.0)
                one_device[t].insert(ids[:, t].contiguous(), None, mass=32.0)
            for group in ((host, device), (one_host, one_device)):
                for a, b in zip(*group):
                    for name in ("keys", "scores", "hot_rows", "occupied", "mass"):
                        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert decays >= 3  # the decays happened (several periods passed)


def test_cce_hybrids_strided_sample_read_on_the_device_is_the_hosts(data, tmp_path):
    from compemb.registry import make_embedding

    tables = [make_embedding("cce-hybrid", 5000, 8, compression=8, seed=3) for _ in range(2)]
    tables[1].sketch.mass_on_device = True
    generator = torch.Generator().manual_seed(2)
    assert tables[0].sketch_stride > 1
    with use_kernels("torch"):
        for size in (101, 64, 257, 99, 100, 3):  # sizes that a stride does and does not divide
            ids = torch.randint(0, 5000, (size,), generator=generator)
            for table in tables:
                table._update(ids, None, None)
    for name in ("keys", "scores", "occupied", "mass"):
        assert torch.equal(getattr(tables[0].sketch, name), getattr(tables[1].sketch, name)), name


@pytest.mark.parametrize("changes, named", [({}, "needs a CUDA device"), ({"compile": True}, "needs a CUDA device")])
def test_cuda_graph_is_refused_on_cpu_in_one_line(data, changes, named, capsys, tmp_path):
    from compemb.cli import main

    with pytest.raises(ValueError, match=named):
        dataclasses.replace(_config(data, "hash"), cuda_graph=True, **changes)
    argv = ["train", "--data", data, "--out", str(tmp_path / "run"), "--cuda-graph"]
    assert named in one_line_error(capsys, main(argv))
    assert not (tmp_path / "run").exists()


class _GraphOnCpu:
    """compemb.cuda_graph.StepGraph's bookkeeping without CUDA: a "replay" runs the step body."""

    made: list["_GraphOnCpu"] = []
    steps: list[str] = []  # "R" for a replayed step, "E" for an eager one, in order

    def __init__(self, body, device):
        self.body, self.shapes, self.captures, self.replayed_rows, self.warm = body, None, 0, [], False
        _GraphOnCpu.made.append(self)

    def ready(self):
        return self.shapes is not None or self.warm

    def invalidate(self):
        self.shapes, self.warm = None, False

    def run(self, batch):
        if self.shapes != [t.shape for t in batch]:
            assert self.warm, "a capture without a steady eager step before it"
            self.shapes, self.captures = [t.shape for t in batch], self.captures + 1
        self.body(tuple(batch))
        self.replayed_rows.append(len(batch[2]))
        _GraphOnCpu.steps.append("R")


@pytest.mark.parametrize("method", ["cafe", "cce-paper"])
def test_the_trainer_replays_steady_steps_and_runs_the_rest_eagerly(data, method, tmp_path, monkeypatch):
    """Two epochs of 9 steps (the last one short), an evaluation after each, CCE clustering every 5 steps: the
    warm-up, short batches and clusterings run eagerly, everything else is replayed, the graph captured again after
    each eager step or evaluation, never before a steady step ran eagerly; the result is the eager run's (to float
    rounding)."""
    monkeypatch.setattr(cuda_graph, "StepGraph", _GraphOnCpu)
    monkeypatch.setattr(
        cuda_graph, "eager_on_side_stream", lambda body, device: (_GraphOnCpu.steps.append("E"), body())
    )
    options = {"cluster_every": 5} if method == "cce-paper" else {}
    results = {}
    for graph in (False, True):
        config = _config(
            data, method, out=str(tmp_path / f"graph{graph}"), epochs=2, kernels="torch", method_options=options
        )
        config.cuda_graph = graph  # (refused on CPU when built: set past the check, as a CUDA machine would pass it)
        trainer = Trainer(config, quiet=True)
        _GraphOnCpu.steps.clear()
        results[graph] = trainer.fit()
    graph, steps = _GraphOnCpu.made[-1], "".join(_GraphOnCpu.steps)
    assert trainer.total_steps == len(steps) == 18
    assert set(graph.replayed_rows) == {512}  # short batches never replayed
    # the warm-up (its last step warms the graph: captured at step 3), each epoch's short last batch, then a steady
    # step run eagerly before the graph is captured again
    assert steps[:4] == "EEER" and steps[8] == steps[17] == "E" and steps[9] == "E"
    clusterings = results[True].get("clusterings", 0)
    assert (clusterings > 0) == (method == "cce-paper")
    assert steps.count("E") >= cuda_graph.WARMUP_STEPS + 2 + (clusterings - 1)  # (one may fall on a short batch)
    assert graph.captures == steps.count("ER")  # captured again after every eager step
    assert results[True]["bce"] == pytest.approx(results[False]["bce"], abs=1e-5)
    assert results[True]["step"] == results[False]["step"] == 18
