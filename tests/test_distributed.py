"""Data-parallel training under torchrun: 2 gloo processes on a CPU against 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcurlora_seg.engine import distributed
from tcurlora_seg.engine.distributed import Dist
from tcurlora_seg.errors import UserError
from tests.conftest import write_official_dataset
from tests.run_helpers import scalars

REPO = Path(__file__).resolve().parents[1]


# Each backbone's tiny model, no dropout, on volumes the size of its smallest crop (Swin UNETR's bottleneck needs 64³).
BACKBONES = {
    "unetr": (["model=unetr_tiny", "model.dropout_rate=0", "data.roi_size=[32,32,32]"], (32, 32, 32)),
    "swin_unetr": (["model=swin_unetr_tiny", "data.roi_size=[64,64,64]"], (64, 64, 64)),
}


def deterministic_run(root: Path, *extra: str, backbone: str = "unetr") -> list[str]:
    """A tiny model on volumes of its crop's size, no flips, no intensity noise, no dropout: nothing random but the
    case order, so that 2 processes x batch 1 must take the same steps as 1 process x batch 2. SGD, not Adam: Adam
    is blind to a constant gradient scale (a sum over ranks instead of the mean would pass) and turns float noise in
    near-zero gradients into full-size steps."""
    return [
        "data=official", f"data.root={root}", *BACKBONES[backbone][0], "data.num_workers=0", "data.cache=none",
        "data.augment.flip_prob=0", "data.augment.intensity_prob=0",
        "model.pretrained=null", "peft.rank=2", "optim=sgd", "trainer.max_epochs=2", "trainer.epoch_length=2",
        "trainer.val_interval=1", "trainer.sw_batch_size=2", "trainer.progress=false", "trainer.evaluate=false",
        "trainer.device=cpu", *extra,
    ]


def launch(cwd: Path, *args: str, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    prefix = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *prefix, "-m", "tcurlora_seg.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    adapter = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["adapter"]

    def flat(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            elif torch.is_tensor(value) and value.is_floating_point():
                yield f"{prefix}{key}", value

    return dict(flat(adapter))


def run_folders(cwd: Path) -> list[Path]:
    return [p.parent for p in (cwd / "outputs").glob("**/config.yaml") if p.parent.name != ".hydra"]


pytestmark = pytest.mark.xdist_group("distributed")  # the two launches the tests compare run once


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def runs(request, tmp_path_factory) -> dict[str, Path]:
    backbone = request.param
    tmp = tmp_path_factory.mktemp(f"ddp_{backbone}")
    root = write_official_dataset(tmp / "toy", shape=BACKBONES[backbone][1])
    (root / "train.txt").write_text("sub1\nsub2\n")  # one global batch per step, whatever the process count
    (root / "valid.txt").write_text("sub3\nsub4\n")  # one validation case per rank: their metrics are gathered
    out = {}
    for name, nproc, batch in (("two", 2, 1), ("one", 1, 2)):
        cwd = tmp / name
        cwd.mkdir()
        result = launch(cwd, *deterministic_run(root, f"data.batch_size={batch}", backbone=backbone), nproc=nproc)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        folders = run_folders(cwd)
        assert len(folders) == 1, folders  # one run folder, whatever the ranks' clocks named theirs
        out[name] = folders[0]
        out[f"{name}_stderr"] = result.stderr
    return out


def test_two_processes_take_the_steps_of_one_process_with_the_global_batch(runs):
    one, two = runs["one"], runs["two"]
    loss_one, loss_two = scalars(one, "train/loss"), scalars(two, "train/loss")
    assert len(loss_one) == len(loss_two) == 4
    assert loss_two == pytest.approx(loss_one, abs=1e-4)  # the global-batch loss, every iteration
    assert loss_one[-1] < loss_one[0]  # and it trained
    # validation: each rank scores one case; the gathered metrics are those of both cases
    assert scalars(two, "val/dice") == pytest.approx(scalars(one, "val/dice"), abs=0.1)
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def test_rank_zero_alone_writes_the_run_folder(runs):
    two = runs["two"]
    assert len(list((two / "tensorboard").glob("events.*"))) == 1  # one writer
    stats = json.loads((two / "train_stats.json").read_text())
    assert stats["processes"] == 2 and stats["timed_steps"] == 3
    assert (two / "split.json").is_file() and (two / "checkpoints" / "best.pt").is_file()
    assert torch.load(two / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert runs["two_stderr"].count("data OK") == 0  # the data report is printed once, by rank 0, on stdout


def _on_main_worker(rank: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = Dist(rank, 2, rank)
    try:
        got = distributed.on_main(ctx, lambda: "from rank 0")
        gathered = distributed.all_gather(ctx, rank * 10)
        mean = float(distributed.mean(ctx, torch.tensor(float(rank))))

        def fail() -> None:
            raise UserError("data.root=/nowhere: not found")

        try:
            distributed.on_main(ctx, fail)
            error = None
        except UserError as err:
            error = str(err)
        queue.put((rank, got, gathered, mean, error))
    finally:
        dist.destroy_process_group()


def test_on_main_hands_result_and_error_to_every_rank(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_on_main_worker, args=(rank, str(tmp_path / "init"), queue)) for rank in range(2)]
    for w in workers:
        w.start()
    results = sorted(queue.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=60)
    for rank, got, gathered, mean, error in results:
        assert got == "from rank 0" and gathered == [0, 10] and mean == 0.5
        assert error == "data.root=/nowhere: not found"  # rank 1 stops too instead of waiting for rank 0


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx, device = distributed.init("cpu")
    assert not ctx.enabled and ctx.is_main and device == torch.device("cpu")
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(ctx, model, device) is model
    assert distributed.broadcast(ctx, 3) == 3 and distributed.all_gather(ctx, 3) == [3]
    with pytest.raises(UserError):
        distributed.on_main(ctx, lambda: (_ for _ in ()).throw(UserError("x")))
