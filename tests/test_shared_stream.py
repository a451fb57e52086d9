"""benchmarks/shared_stream.py (many coders per read) in a CI-sized form, on the cache `bae study` made."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import shared_stream  # noqa: E402


def test_the_shared_stream_benchmark_reads_once_per_step_when_shared(quickstart_run, tmp_path, capsys):
    run, _ = quickstart_run
    out = tmp_path / "shared.json"
    args = ["--cache", str(run / "cache"), "--ns", "1,3", "--steps", "2", "--repeats", "1", "--latents", "64"]
    assert shared_stream.main([*args, "--batch", "128", "--out", str(out)]) == 0
    assert "shared/sep" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 3]
    three = rows[1]["median"]
    # Three coders: the separate trials read three batches a step, the shared stream one.
    assert three["separate"]["batches_read"] == 3 * 2 and three["shared"]["batches_read"] == 2
    assert (three["separate"]["readers"], three["shared"]["readers"]) == (3, 1)  # a reader of its own per coder
    assert all(r["bound"] >= 1 and r["step_ratio"] > 0 for r in rows)
    assert all(0 < r["median"][m]["read_share"] < 1 for r in rows for m in ("separate", "shared"))
    assert shared_stream.main(["--cache", str(tmp_path / "missing")]) == 2
