"""The examples store's pure parts: file names, atomic writes, the buffer's flush rules, the reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiokafka import ConsumerRecord

from rtml.core.errors import InvalidInput, UnprocessableRecord
from rtml.core.kafka import Consumed
from rtml.core.schemas import Example
from rtml.core.settings import Settings
from rtml.feedback import examples as store
from rtml.feedback.examples import ExamplesWriter, Stored, day_of, part_path, read_examples, write_stored

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def example(pid: str, *, t: int = T0, item: str | None = None, label: float = 1.0, **features: float | None) -> Example:
    return Example(
        prediction_id=pid, model="ctr", version="3", entities={"user_id": "u1", "item_id": item or "i0"},
        features=features or {"a": 1.0}, score=0.25, label=label, predicted_at=t, labelled_at=t + 60_000,
        item_id=item, shadow={"4": 0.5},
    )  # fmt: skip


def record(value: bytes | None, offset: int = 0) -> ConsumerRecord:
    return ConsumerRecord("t.examples", 0, offset, 0, 0, None, value, None, 0, 0, [])


def test_day_is_the_utc_day_of_the_label_time() -> None:
    assert day_of(T0) == "2026-01-01"
    assert day_of(T0 - 1) == "2025-12-31"
    assert day_of(T0 + DAY - 1) == "2026-01-01"


def test_file_names_carry_model_day_partition_and_offset_range(tmp_path: Path) -> None:
    assert part_path(tmp_path, "ctr", "2026-01-01", 3, 10, 42) == (
        tmp_path / "model=ctr" / "date=2026-01-01" / "part-3-10-42.parquet"
    )
    assert part_path(tmp_path, "a/b c", "2026-01-01", 0, 1, 1).parent.parent.name == "model=a%2Fb%20c"


def test_rows_are_grouped_per_model_day_and_partition_with_their_own_offset_range(tmp_path: Path) -> None:
    next_day = example("p3", t=T0 + DAY)
    other = example("p4").model_copy(update={"model": "fraud"})
    rows = [Stored(0, 7, example("p1")), Stored(1, 2, example("p2")), Stored(0, 9, example("p5")),
            Stored(0, 8, next_day), Stored(1, 5, other)]  # fmt: skip
    paths = write_stored(tmp_path, rows)
    names = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert names == [
        "model=ctr/date=2026-01-01/part-0-7-9.parquet",
        "model=ctr/date=2026-01-01/part-1-2-2.parquet",
        "model=ctr/date=2026-01-02/part-0-8-8.parquet",
        "model=fraud/date=2026-01-01/part-1-5-5.parquet",
    ]
    table = pq.read_table(tmp_path / names[0])
    assert table.column("prediction_id").to_pylist() == ["p1", "p5"]  # offset order
    row = table.to_pylist()[0]
    assert orjson.loads(row["entities"]) == {"user_id": "u1", "item_id": "i0"}
    assert orjson.loads(row["shadow"]) == {"4": 0.5}
    assert row["f_a"] == 1.0 and row["label"] == 1.0 and row["score"] == 0.25 and row["version"] == "3"
    assert row["predicted_at"].timestamp() * 1000 == T0
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary file left


def test_a_failed_write_leaves_the_final_name_untouched_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [path] = write_stored(tmp_path, [Stored(0, 1, example("p1"))])
    before = path.read_bytes()

    def broken(table: Any, where: Any, **kwargs: Any) -> None:
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_stored(tmp_path, [Stored(0, 1, example("p1", label=0.0))])
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_redelivered_range_rewrites_the_same_file(tmp_path: Path) -> None:
    rows = [Stored(0, 1, example("p1")), Stored(0, 2, example("p2"))]
    assert write_stored(tmp_path, rows) == write_stored(tmp_path, rows)
    assert len(list(tmp_path.rglob("*.parquet"))) == 1


def test_reader_deduplicates_orders_by_prediction_time_and_fills_missing_features(tmp_path: Path) -> None:
    write_stored(tmp_path, [Stored(0, 1, example("late", t=T0 + 5_000, a=2.0)),
                            Stored(0, 2, example("early", t=T0, a=None)),
                            Stored(0, 3, example("late", t=T0 + 5_000, a=2.0))])  # fmt: skip
    # an overlapping range under another name (a redelivery batched differently), and a newer feature
    write_stored(tmp_path, [Stored(0, 3, example("late", t=T0 + 5_000, a=2.0)),
                            Stored(0, 4, example("rec", t=T0 + 1_000, item="i1", a=3.0, b=7.0)),
                            Stored(0, 5, example("rec", t=T0 + 1_000, item="i2", a=4.0, b=None))])  # fmt: skip
    got = read_examples(tmp_path, "ctr")
    assert got.prediction_ids == ["early", "rec", "rec", "late"]
    assert got.item_ids == [None, "i1", "i2", None]
    assert got.predicted_at.tolist() == [T0, T0 + 1_000, T0 + 1_000, T0 + 5_000]
    assert got.feature_names == ["a", "b"]
    assert got.matrix(["b", "a", "zz"], {"a": -1.0, "b": -2.0}).tolist() == [
        [-2.0, -1.0, 0.0], [7.0, 3.0, 0.0], [-2.0, 4.0, 0.0], [-2.0, 2.0, 0.0]
    ]  # fmt: skip
    assert got.feature_dicts()[1] == {"a": 3.0, "b": 7.0}
    assert got.labels.tolist() == [1.0] * 4 and got.scores.tolist() == [0.25] * 4 and got.versions == ["3"] * 4

    since = read_examples(tmp_path, "ctr", since_ms=T0 + 1_000)
    assert since.prediction_ids == ["rec", "rec", "late"]


def test_reader_says_clearly_when_there_is_nothing_to_read(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no stored examples for model 'ctr'"):
        read_examples(tmp_path, "ctr")
    write_stored(tmp_path, [Stored(0, 1, example("p1"))])
    with pytest.raises(InvalidInput, match="predicted since"):
        read_examples(tmp_path, "ctr", since_ms=T0 + 1)  # same day, later than every row
    with pytest.raises(InvalidInput, match="predicted since"):
        read_examples(tmp_path, "ctr", since_ms=T0 + 3 * DAY)  # no day partition that late


def test_decode_names_what_is_wrong_with_an_invalid_record(tmp_path: Path) -> None:
    writer = ExamplesWriter(Settings(examples_dir=tmp_path))
    assert writer.decode(record(example("p1").model_dump_json().encode())).prediction_id == "p1"
    bad = example("p1").model_dump(mode="json")
    del bad["label"]
    with pytest.raises(UnprocessableRecord, match="not an example: label: Field required"):
        writer.decode(record(orjson.dumps(bad)))
    with pytest.raises(UnprocessableRecord, match="not an example"):
        writer.decode(record(b"{not json"))
    with pytest.raises(UnprocessableRecord, match="empty"):
        writer.decode(record(None))


async def test_buffer_is_due_when_full_or_old_and_forgets_only_what_it_wrote(tmp_path: Path) -> None:
    writer = ExamplesWriter(Settings(examples_dir=tmp_path, examples_flush_rows=3, examples_flush_s=3600))
    assert writer.due() and writer.room() == 3  # nothing buffered: only offsets to commit
    await writer.handle([Consumed(record(b"", 0), example("p0")), Consumed(record(b"", 1), example("p1"))])
    assert not writer.due() and writer.room() == 1
    await writer.handle([Consumed(record(b"", 2), example("p2"))])
    assert writer.due() and writer.room() == 0
    await writer.flush()
    assert writer.buffered == 0 and len(read_examples(tmp_path, "ctr")) == 3

    old = ExamplesWriter(Settings(examples_dir=tmp_path, examples_flush_rows=3, examples_flush_s=0.001))
    await old.handle([Consumed(record(b"", 3), example("p3"))])
    while not old.due():  # age, not size
        pass
    old.discard()
    assert old.buffered == 0 and old.due()
