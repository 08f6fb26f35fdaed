"""Data that never vanishes, at the loader: truncated shards (cut at every kind of offset) are
counted with the samples lost and never deliver a sample without its caption; a shard holding fewer
samples than its manifest is counted; transient read failures are retried, lasting ones counted
under their own reason; captions lose a BOM and invalid UTF-8 is refused; every skip report names
the bare tar key; and a bug in our own sample code stops the run with the shard and the key."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from test_data_pipeline import _png, good_samples, small_cfg

from lumina_illus.data import build_loader, write_shards
from lumina_illus.data.shards import iter_tar


def _captioned(n: int) -> list[dict]:
    """Samples with png, txt (the caption) and json (tags that differ from the caption)."""
    out = good_samples(n)
    for s in out:
        s["txt"] = f"caption of {s['__key__']}"
    return out


def _epoch0(shards: list[str], **kw) -> tuple[list, list, dict]:
    cfg = small_cfg(shards, num_workers=0, batching="bucket", caption={"caption_dropout": 0.0, "nl_prob": 1.0}, **kw)
    ld = build_loader(cfg, micro_batch=1, rank=0, world_size=1, seed=0)
    captions: dict[str, str] = {}
    its = iter(ld)
    sources, skips = [], []
    for _ in range(200):
        b = next(its)
        sources += ld.last_sources
        skips += ld.last_skips
        captions[b.keys[0]] = b.captions[0]
        if ld.state_dict()["cursor"]["epoch"] > 0:  # every sample of epoch 0 delivered or counted
            break
    return [s for s in sources if s[0] == 0], [s for s in skips if s[0] == 0], captions


def _offsets(tar_path: Path) -> dict[str, int]:
    with tarfile.open(tar_path) as tar:
        m = {x.name: x for x in tar.getmembers()}
    last = max(m.values(), key=lambda x: x.offset)
    return {
        "inside image data": m["k00003.png"].offset_data + 30,
        "header boundary between samples": m["k00003.json"].offset,  # k00003 starts here (its json first)
        "between the files of one sample": m["k00003.txt"].offset,  # json and png of k00003 read, txt not
        "inside a header": m["k00003.txt"].offset + 100,
        "after the last member, before the end marker": last.offset_data + 512,
    }


@pytest.mark.parametrize("where", ["inside image data", "header boundary between samples",
                                   "between the files of one sample", "inside a header",
                                   "after the last member, before the end marker"])
def test_truncated_shard_counts_the_samples_lost(tmp_path: Path, where: str) -> None:
    write_shards(_captioned(6), tmp_path, 6)
    tar = tmp_path / "shard-000000.tar"
    data = tar.read_bytes()
    cut = _offsets(tar)[where]
    tar.write_bytes(data[:cut])
    got, skips, captions = _epoch0([str(tar)])
    kept = 5 if where.startswith("after the last") else 3  # the group being read when the file ends is lost
    assert sorted(i for _, _, i in got) == list(range(kept))
    assert [(s[3], s[7]) for s in skips] == [("truncated_tar", 6 - kept)]
    assert f"{6 - kept} of its 6 samples lost" in skips[0][6]
    # no sample was trained without its caption (a sample cut between its files is not delivered)
    assert all(c == f"caption of {k.split('/')[-1]}" for k, c in captions.items())


def test_iter_tar_tells_a_complete_archive_from_a_cut_one(tmp_path: Path) -> None:
    write_shards(_captioned(3), tmp_path, 3)
    tar = tmp_path / "shard-000000.tar"
    data = tar.read_bytes()
    assert not any(isinstance(x, Exception) for x in iter_tar(str(tar)))
    end = data.rindex(b"caption of k00002") + 512  # past the last member's padded data: only the end marker left
    end -= end % 512
    for cut in range(512, end + 1, 512):  # every block boundary of the archive, end marker excluded
        tar.write_bytes(data[:cut])
        assert isinstance(list(iter_tar(str(tar)))[-1], Exception), cut
    tar.write_bytes(data[: end + 512])  # the first zero block of the marker is enough for tar(1) too
    assert not any(isinstance(x, Exception) for x in iter_tar(str(tar)))


def test_fewer_samples_than_the_manifest_are_counted(tmp_path: Path) -> None:
    write_shards(_captioned(6), tmp_path, 6)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 8  # e.g. a shard rewritten in place with fewer samples
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    got, skips, _ = _epoch0([str(tmp_path / "shard-000000.tar")])
    assert len(got) == 6
    assert [(s[3], s[7]) for s in skips] == [("truncated_tar", 2)] and "manifest lists 8" in skips[0][6]


def test_transient_failures_are_retried_and_lasting_ones_counted_by_reason(tmp_path: Path) -> None:
    write_shards(_captioned(6), tmp_path / "a", 6, prefix="a")
    write_shards(_captioned(4), tmp_path / "b", 4, prefix="b")
    a, b = tmp_path / "a" / "a-000000.tar", tmp_path / "b" / "b-000000.tar"
    flag = tmp_path / "failed-once"
    # a command that fails on its first run (a network hiccup), then serves the shard
    flaky = f"pipe:if [ -f {flag} ]; then cat {a}; else touch {flag}; echo 'connection reset' >&2; exit 56; fi"
    got, skips, _ = _epoch0([flaky], read_retries=2, retry_backoff_s=0.01)
    assert len(got) == 6 and skips == [] and flag.exists()

    flag.unlink()
    got, skips, _ = _epoch0([flaky], read_retries=0)
    assert got == [] and [s[3] for s in skips] == ["pipe_failed"]
    assert "status 56" in skips[0][6] and "connection reset" in skips[0][6]

    # a shard that disappears after the loader was built, and one that cannot be read
    write_shards(_captioned(2), tmp_path / "c", 2, prefix="c")
    c = tmp_path / "c" / "c-000000.tar"
    cfg = small_cfg([str(a), str(b), str(c)], num_workers=0, batching="bucket", read_retries=1,
                    retry_backoff_s=0.01)
    ld = build_loader(cfg, micro_batch=1, rank=0, world_size=1, seed=0)
    a.unlink()
    b.unlink()
    b.mkdir()  # reading a directory: an OSError that is not "file not found"
    it = iter(ld)
    for _ in range(6):  # 3 epochs of the 2 readable samples
        next(it)
    st = ld.stats()
    assert st["shard_errors"]["missing_shard"] >= 2 and st["shard_errors"]["read_error"] >= 2
    # the samples lost are the manifests' counts
    assert st["skipped"]["missing_shard"] == 6 * st["shard_errors"]["missing_shard"]
    assert st["skipped"]["read_error"] == 4 * st["shard_errors"]["read_error"]
    assert st["skipped"]["truncated_tar"] == 0 and st["shard_errors"]["truncated_tar"] == 0
    # nothing readable at all: the loader stops and says why
    ld = build_loader(small_cfg([str(b), str(c)], num_workers=0, read_retries=0), micro_batch=1, rank=0,
                      world_size=1, seed=0)
    c.unlink()
    with pytest.raises(RuntimeError, match=r"no readable sample.*missing_shard \d+, read_error \d+"):
        next(iter(ld))


def test_caption_bom_stripped_and_invalid_utf8_refused(tmp_path: Path) -> None:
    tags = {"tags": {"general": ["x"]}}
    samples = [
        {"__key__": "bom", "png": _png(64, 64, 1), "txt": b"\xef\xbb\xbfhello"},
        {"__key__": "bomjson", "png": _png(64, 64, 2), "json": b"\xef\xbb\xbf" + json.dumps(tags).encode()},
        {"__key__": "latin1", "png": _png(64, 64, 3), "txt": "caf\xe9".encode("latin-1"), "json": tags},
    ]
    write_shards(samples, tmp_path, 10)
    got, skips, captions = _epoch0([str(tmp_path / "shard-000000.tar")])
    assert captions["shard-000000.tar/bom"] == "hello"
    assert captions["shard-000000.tar/bomjson"] == "x"
    assert [(s[3], s[5]) for s in skips] == [("bad_caption_encoding", "latin1")]
    assert "not valid UTF-8" in skips[0][6]


def test_every_skip_report_names_the_bare_tar_key(tmp_path: Path) -> None:
    # bucket mode: the lone 128x128 sample's bucket never fills, it is dropped as bucket_leftover
    samples = good_samples(4)
    samples = [s for s in samples if s["__key__"] != "k00003"]  # k00003 is the only 128x128 one
    samples.append({"__key__": "big", "png": _png(128, 128, 5), "json": {"tags": {"general": ["x"]}}})
    samples.append({"__key__": "empty", "png": b"", "json": {"tags": {"general": ["x"]}}})
    write_shards(samples, tmp_path, 10)
    cfg = small_cfg([str(tmp_path / "shard-000000.tar")], num_workers=0, batching="bucket")
    ld = build_loader(cfg, micro_batch=2, rank=0, world_size=1, seed=0)
    it = iter(ld)
    skips = []
    for _ in range(20):
        next(it)
        skips += ld.last_skips
    reasons = {s[3]: s[5] for s in skips}
    assert reasons["bucket_leftover"] == "big" and reasons["empty_file"] == "empty"
    assert any("key=big:" in r for r in ld.stats()["recent_skips"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bug_in_sample_code_stops_with_shard_and_key(tmp_path: Path, monkeypatch, workers: int) -> None:
    from lumina_illus.data import stream

    write_shards(_captioned(4), tmp_path, 4)

    def broken(*args, **kwargs):  # our own caption code raising a TypeError (a bug, not bad data)
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(stream, "build_caption", broken)  # workers fork: they inherit the patch
    cfg = small_cfg([str(tmp_path / "shard-000000.tar")], num_workers=workers, batching="bucket")
    ld = build_loader(cfg, micro_batch=1, rank=0, world_size=1, seed=0)
    with pytest.raises(stream.SampleBug, match=r"TypeError while building sample key=k0000\d of shard .*shard-000000"):
        next(iter(ld))
    assert ld.stats()["skipped_total"] == 0  # nothing was quietly dropped
