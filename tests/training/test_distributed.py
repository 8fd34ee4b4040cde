"""Data-parallel plumbing, and a real two-process gloo run under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from retfm.models.encoder import encode, load_encoder
from retfm.training.distributed import (
    DistContext,
    distributed_context,
    gather_to_main,
    mean_across,
    shard,
    wrap,
)


def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder() -> None:
    order = np.random.default_rng(0).permutation(103)
    parts = [shard(order, DistContext(rank=r, world_size=4)) for r in range(4)]
    assert {len(p) for p in parts} == {103 // 4}
    joined = np.concatenate(parts)
    assert len(set(joined.tolist())) == len(joined) == 4 * (103 // 4)


def test_single_process_context_is_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_context() as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
        model = torch.nn.Linear(2, 2)
        assert wrap(model, ctx) is model
        assert mean_across(2.5, ctx) == 2.5
        assert gather_to_main("x", ctx) == ["x"]


def test_bad_world_size_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"), distributed_context():
        pass


_RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_pretrain import ARCH, PREP, settings, smooth_images
    from retfm.training import pretrain_fm

    out = Path(sys.argv[1])
    logged = []
    result = pretrain_fm("mae", settings(epochs=2, checkpoint_every_steps=2), ARCH,
                       smooth_images(), out, seed=0, prep=PREP, progress=False, log_every=1,
                       log_fn=lambda m, s: logged.append(s))
    rank = os.environ["RANK"]
    (out / f"rank{{rank}}.json").write_text(json.dumps({{
        "digest": result.param_digest, "steps": result.steps, "loss": result.final_loss,
        "logged": logged}}))
    """
)


def _two_ranks(script_text: str, tmp_path: Path) -> tuple[Path, list[dict]]:
    """Run ``script_text`` (a template taking ``tests``) under torchrun with two CPU processes;
    return its output folder and what each rank wrote (``rank<r>.json``)."""
    script = tmp_path / "rank.py"
    script.write_text(script_text.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.e2e
def test_two_process_gloo_run_agrees_and_writes_a_loadable_encoder(tmp_path: Path) -> None:
    out, ranks = _two_ranks(_RANK_SCRIPT, tmp_path)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical parameters on every rank
    # 96 images / 2 ranks / batch 16 = 3 steps per epoch, 2 epochs
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the logged loss is the all-rank mean
    assert ranks[0]["logged"] == list(range(1, 7)) and ranks[1]["logged"] == []  # rank 0 logs
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["rng"]) == 2  # every rank's RNG, for an exact resume
    encoder, arch, prep, meta = load_encoder(out / "encoder.safetensors")
    with torch.no_grad():
        features = encode(encoder, torch.randn(2, 3, arch.img_size, arch.img_size))
    assert features.shape == (2, arch.embed_dim) and torch.isfinite(features).all()


_DINO_RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_dinov2 import ARCH, PREP, blobs, settings
    from retfm.data.images import ArrayImages
    from retfm.training import pretrain_fm

    out = Path(sys.argv[1])
    result = pretrain_fm("dinov2", settings(epochs=2, batch_size=16), ARCH,
                         ArrayImages(blobs(64, 0)[0]), out, seed=0, prep=PREP, progress=False)
    (out / f"rank{{os.environ['RANK']}}.json").write_text(json.dumps({{
        "digest": result.param_digest, "steps": result.steps, "loss": result.final_loss}}))
    """
)


@pytest.mark.e2e
def test_two_process_dinov2_run_keeps_one_teacher(tmp_path: Path) -> None:
    """Every rank builds the same student and teacher; DDP keeps the students equal and the EMA
    the teachers (DDP does not sync a module without gradients)."""
    out, ranks = _two_ranks(_DINO_RANK_SCRIPT, tmp_path)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the teachers (the FM) are identical
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (64 // 2 // 16)
    assert ranks[0]["loss"] == ranks[1]["loss"]
    _, spec, _, _ = load_encoder(out / "encoder.safetensors")
    assert spec.family == "dinov2"
