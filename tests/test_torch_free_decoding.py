"""Coding without torch: where the compiled kernels run and no GPU device exists, importing the
codec and the command line, and encoding and decoding here and in the worker processes, leave
torch unimported (importing it costs over a second of every process's start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from models import kernels, predictor

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import service.cli  # noqa: F401  (what every voxarc command imports)
    from models import decode_slices, decode_volume, encode_volume, parallel

    def torch_mapped(pid):
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch" in maps.read()

    pids = parallel.warm()
    rng = np.random.default_rng(0)
    volume = (rng.integers(0, 40, (8, 256, 256)).cumsum(axis=2) % 4096).astype(np.uint16)
    blob = encode_volume(volume, adapt=False)
    ok = bool((decode_volume(blob) == volume).all() and (decode_slices(blob, 3, 4) == volume[3:4]).all())
    print(json.dumps({"ok": ok, "workers": len(pids), "here": "torch" in sys.modules,
                      "in_workers": [torch_mapped(pid) for pid in pids]}))
""")


def _python_path() -> dict:
    """The caller's PYTHONPATH, so that the child imports the same tree."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


@pytest.mark.skipif(not sys.platform.startswith("linux") or not kernels.available()
                    or not predictor._no_gpu_device(),
                    reason="torch is needed here: no compiled kernels, or a GPU device")
def test_coding_leaves_torch_unimported():
    env = {"VOXARC_DECODE_WORKERS": "2", "PATH": "/usr/bin:/bin", **_python_path()}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["workers"] == 2
    assert result["here"] is False
    assert result["in_workers"] == [False, False]


ADAPT_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from models import decode_volume, encode_volume, tune_workers

    def torch_mapped(pid):
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch" in maps.read()

    rng = np.random.default_rng(1)
    volume = (rng.integers(0, 40, (8, 128, 128)).cumsum(axis=2) % 4096).astype(np.uint16)
    blob = encode_volume(volume, adapt=True)
    tuners = list(tune_workers._POOL._processes) if tune_workers._POOL else []
    print(json.dumps({"ok": bool((decode_volume(blob) == volume).all()),
                      "here": "torch" in sys.modules,
                      "tuners": [torch_mapped(pid) for pid in tuners]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not kernels.available()
                    or not predictor._no_gpu_device(),
                    reason="torch is needed here: no compiled kernels, or a GPU device")
def test_adaptation_imports_torch_in_its_tuning_processes_only():
    """The encoder draws and scores its adaptation samples without torch (models.samples);
    only the fine-tuning processes, which import it as they start, map it."""
    env = {"VOXARC_DECODE_WORKERS": "2", "VOXARC_TUNE_WORKERS": "1", "PATH": "/usr/bin:/bin",
           **_python_path()}
    out = subprocess.run([sys.executable, "-c", ADAPT_SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"]
    assert result["here"] is False
    assert result["tuners"] == [True, True]
