"""Smoke test of the serving benchmark at a tiny size: files, schema, numbers consistent with
each other. No test asserts a speed."""
import json

import pytest

from benchmarks.serving import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving")
    main(["--config", "tiny", "--streams", "1,2", "--chunks", "5", "--out", str(out)])
    return out, json.loads((out / "serving.json").read_text())


def test_report_files_and_rows(report):
    out, res = report
    assert (out / "serving.md").read_text().count("\n| ") == 3  # header + 2 rows
    assert [r["streams"] for r in res["runs"]] == [1, 2]
    assert res["decoder"] == "vae" and res["decoder_impl"] == "vae" and "vae decoder" in (out / "serving.md").read_text()
    for r in res["runs"]:
        assert len(r["per_stream"]) == r["streams"]
        assert all(s["chunks"] == 5 and s["end"] == "complete" for s in r["per_stream"])
        assert r["frames"] == sum(s["frames"] for s in r["per_stream"])
        assert r["aggregate_fps"] == pytest.approx(r["frames"] / r["wall_s"])
        assert r["chunk_latency_p99_s"] >= max(s["chunk_latency_p50_s"] for s in r["per_stream"]) > 0
        assert r["switch_s"] > 0, "stream 0 switched its prompt mid-way and the latency was measured"
    assert res["cut"]["switch_mode"] == "cut" and res["cut"]["switch_s"] > 0
    assert res["runs"][1]["ticks"] < 2 * res["runs"][0]["ticks"], "two streams shared the step calls"


def test_tiny_decoder_needs_a_model_that_ships_one(tmp_path):
    with pytest.raises(ValueError, match="no tiny decoder"):
        main(["--config", "tiny", "--decoder", "tiny", "--streams", "1", "--chunks", "5", "--out", str(tmp_path)])
