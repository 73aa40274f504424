"""bench/models.py's pure parts, in milliseconds: the replay error against a model whose memory is known, the
memory per extra version, the repository it builds and the log lines it reads. The benchmark itself starts
servers for minutes and is not run here (`python -m bench.models --quick`)."""

from __future__ import annotations

import json

import numpy as np

from bench.models import load_summary, log_entries, log_time, make_repository, per_extra_version, replay_errors


def leaky(decay: float):
    """A one-unit model that forgets at a known rate: state = decay * state + x, output = state."""

    def run(inputs: list[np.ndarray], states: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        outputs, new = [], states.copy()
        for row, chunk in enumerate(inputs):
            ys = []
            for x in chunk[:, 0]:
                new[row, 0] = decay * new[row, 0] + x
                ys.append([new[row, 0]])
            outputs.append(np.asarray(ys, np.float32))
        return outputs, new

    return run


def test_replay_error_shrinks_as_the_model_forgets_and_is_zero_for_the_whole_sequence() -> None:
    decay, length, after = 0.5, 40, 5
    sequences = np.random.default_rng(0).normal(size=(3, length + after + 1, 1)).astype(np.float64)
    rows = replay_errors(leaky(decay), 1, sequences, length, [0, 2, 8, length], after)
    assert [r["window"] for r in rows] == [0, 2, 8, length]
    assert rows[-1]["whole_sequence"] and rows[-1]["max_abs"] == 0 and rows[-1]["state_max_abs"] == 0
    # The state rebuilt from the last N inputs misses decay**N times the state N steps before the switch.
    before = leaky(decay)(list(sequences[:, :length - 8]), np.zeros((3, 1)))[1]
    assert np.isclose(rows[2]["state_max_abs"], np.abs(decay ** 8 * before).max())
    # The first output after the switch carries that miss times decay, and later ones less.
    assert np.isclose(rows[2]["max_abs"], decay * rows[2]["state_max_abs"])
    assert rows[0]["max_abs"] > rows[1]["max_abs"] > rows[2]["max_abs"] > 0
    assert rows[2]["max_abs_last_step"] < rows[2]["max_abs_first_step"]
    assert np.isclose(rows[0]["relative_rms"], rows[0]["rms"] / rows[0]["outputs_rms"])


def test_memory_per_extra_version_is_the_difference_of_medians_over_the_extra_versions() -> None:
    rows = [{"versions_loaded": 1, "rss": 100.0}, {"versions_loaded": 4, "rss": 160.0},
            {"versions_loaded": 1, "rss": 104.0}, {"versions_loaded": 4, "rss": 163.0},
            {"versions_loaded": 1, "rss": 500.0}]
    assert per_extra_version(rows, "rss") == (161.5 - 104.0) / 3


def test_load_summary_keeps_each_version_by_its_place_in_the_load_order() -> None:
    def row(loaded: int, load_s: list[float], rss: float) -> dict:
        return {"versions_loaded": loaded, "xla": True, "load_s": load_s, "ready_s": 5.0 + loaded, "warm_s": 6.0,
                "compiles": 2 * loaded, "compile_s": 1.5 * loaded, "rss_ready_mib": rss, "rss_warm_mib": rss + 90}

    (summary,) = load_summary([row(1, [1.0], 570), row(4, [1.0, 2.0, 3.0, 4.0], 690),
                               row(4, [1.2, 2.2, 3.2, 4.4], 700), row(1, [1.4], 580)])
    assert summary["load_s"] == {1: [1.2], 4: [1.1, 2.1, 3.1, 4.2]}
    assert summary["load_s_range"] == [1.0, 4.4]
    assert summary["compile_s_per_version"] == {1: 1.5, 4: 1.5}
    assert summary["mib_per_extra_version_warm"] == (695 - 575) / 3


def test_repository_layout_and_log_lines(tmp_path) -> None:
    model = tmp_path / "x.keras"
    model.write_bytes(b"model")
    root = make_repository(tmp_path / "repo", 2, 3, model)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("model.keras")) == [
        f"m{m}/{v}/model.keras" for m in range(2) for v in range(1, 4)]
    lines = [json.dumps({"ts": "2026-12-07T16:00:01.250Z", "msg": "model loaded", "version": 2, "seconds": 3.1}),
             "not json", json.dumps({"ts": "2026-12-07T16:00:02.000Z", "msg": "compiled", "seconds": 0.4}),
             json.dumps({"msg": "serving", "note": "model loaded"})]
    loaded = log_entries("\n".join(lines), "model loaded")
    assert [e["seconds"] for e in loaded] == [3.1]
    assert log_time(loaded[0]) == 1796659201.25
