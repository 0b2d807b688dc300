"""The model registry on a real local folder: versions, atomic promotion with compare-and-swap, the lock."""

import json
import multiprocessing
import os
import time

import pytest

from pipeline.registry import PromotionConflictError, Registry, RegistryLockedError


def _try_lock(uri: str, barrier, results) -> None:
    """One of several processes racing for the lock (module level: multiprocessing pickles it)."""
    registry = Registry(uri)
    barrier.wait()
    try:
        with registry.lock(f"racer-{os.getpid()}", stale_after_s=3600):
            results.put("won")
            time.sleep(1.0)  # hold it while the others try
    except RegistryLockedError:
        results.put("refused")


def test_versions_are_numbered_and_the_index_names_the_promoted_one(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    assert registry.promoted() is None and registry.versions() == [] and registry.last_decided() is None
    with registry.lock("test", stale_after_s=60) as lock:
        v1 = registry.new_version()
        registry.write_record(v1, {"status": "training"})
        assert registry.last_decided() is None  # undecided versions do not count as seen data
        registry.write_record(v1, {"status": "promoted"})
        registry.promote(v1, expected=None, lock=lock, reason="first")
        v2 = registry.new_version()
    assert (v1, v2) == ("v1", "v2") and registry.versions() == ["v1", "v2"]
    assert registry.promoted() == "v1" and registry.last_decided() == "v1"
    index = json.loads((tmp_path / "registry" / "index.json").read_text())
    assert index["history"][0]["version"] == "v1" and index["history"][0]["reason"] == "first"
    assert not (tmp_path / "registry" / "lock.json").exists()  # released on exit


def test_promotion_is_a_compare_and_swap(tmp_path):
    registry = Registry(str(tmp_path))
    with registry.lock("a", stale_after_s=60) as lock:
        registry.promote("v1", expected=None, lock=lock)
        with pytest.raises(PromotionConflictError, match="names 'v1', this run started from None"):
            registry.promote("v2", expected=None, lock=lock)
        registry.promote("v2", expected="v1", lock=lock)
    assert registry.promoted() == "v2"
    assert [h["previous"] for h in registry.index()["history"]] == [None, "v1"]


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    registry = Registry(str(tmp_path))
    with registry.lock("first run", stale_after_s=3600):
        with pytest.raises(RegistryLockedError, match="locked by 'first run'.*does nothing"):
            with Registry(str(tmp_path)).lock("second run", stale_after_s=3600):
                pass
    with registry.lock("third run", stale_after_s=3600):  # free again once released
        pass


def test_exactly_one_of_several_racing_processes_gets_the_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_try_lock, args=(str(tmp_path), barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused", "refused", "won"]


def test_a_stale_lock_is_broken_and_its_holder_can_no_longer_promote(tmp_path):
    registry = Registry(str(tmp_path))
    with registry.lock("crashed run", stale_after_s=3600) as old:
        record = json.loads((tmp_path / "lock.json").read_text())
        record["created_unix"] -= 7200  # two hours old
        (tmp_path / "lock.json").write_text(json.dumps(record))
        with registry.lock("next run", stale_after_s=3600) as new:
            with pytest.raises(PromotionConflictError, match="no longer holds"):
                registry.promote("v1", expected=None, lock=old)
            registry.promote("v1", expected=None, lock=new)
    assert registry.promoted() == "v1"


def test_a_version_model_is_written_once(tmp_path):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    registry = Registry(str(tmp_path / "registry"))
    with registry.lock("t", stale_after_s=60):
        v1 = registry.new_version()
        target = registry.store_model(v1, str(model))
        assert json.loads((tmp_path / "registry" / "versions" / "v1" / "model" / "config.json").read_text()) == {}
        with pytest.raises(FileExistsError, match="written once"):
            registry.store_model(v1, str(model))
    assert target.endswith("versions/v1/model")
