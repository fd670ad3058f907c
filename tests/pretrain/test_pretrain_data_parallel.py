"""pretrain under torchrun (2 CPU processes, gloo): the shared loop averages the gradients over ranks
(train.dist.all_reduce_grads, no DDP wrapper), so both ranks end with the same parameters, and rank 0
writes the backbone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import hashlib, sys
    import imgclust.pretrain.trainer as T
    from imgclust.data import open_source
    from imgclust.data.base import SubsetSource

    run_loop = T.run_loop

    def spy(model, *a, **k):
        res = run_loop(model, *a, **k)
        h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        print("RANK", T.dist.rank(), h, flush=True)
        return res

    T.run_loop = spy
    src = SubsetSource.sample(open_source("digits"), 48, seed=0)
    cfg = T.PretrainConfig(method="byol", arch="resnet18", epochs=2, image_size=8, batch_size=8, warmup_epochs=1,
                           monitor_size=32, proj_hidden=64, proj_dim=32, pred_hidden=64)
    T.pretrain(src, sys.argv[1], cfg, device="cpu", progress=False)
''')


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_two_ranks_end_with_the_same_parameters(tmp_path: Path) -> None:
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    hashes = dict(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RANK"))
    assert set(hashes) == {"0", "1"} and hashes["0"] == hashes["1"]
    assert (tmp_path / "out" / "backbone.pt").is_file() and (tmp_path / "out" / "checkpoint.pt").is_file()
