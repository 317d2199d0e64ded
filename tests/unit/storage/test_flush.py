"""The write -> sync state machine (``storage/flush.py``): the transition table of
:class:`FlushState`, and the decisions of :class:`Pipeline`, driven by hand (no threads)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import records
from storage.checkpoint import Checkpoint, new_checkpoint
from storage.errors import IllegalTransition
from storage.flush import Event, FlushState, Health, Job, Mark, Pipeline, Stage
from storage.segment import Segment

# ------------------------------------------------------------------------- FlushState


def state_after(*events: Event) -> FlushState:
    state = FlushState()
    for event in events:
        state.process(event)
    return state


def test_a_new_pipeline_is_idle_and_open() -> None:
    state = FlushState()
    assert (state.writer, state.syncer, state.health) == (Stage.IDLE, Stage.IDLE, Health.OPEN)
    assert state.idle


def test_write_then_sync_holds_the_syncer_until_its_write_completes() -> None:
    state = state_after(Event.WRITE_THEN_SYNC)
    assert (state.writer, state.syncer) == (Stage.WRITING, Stage.AWAITING_WRITE)
    state.process(Event.WRITTEN)
    assert (state.writer, state.syncer) == (Stage.IDLE, Stage.SYNCING)
    state.process(Event.SYNCED)
    assert state.idle and state.health is Health.OPEN


def test_a_failed_write_of_a_write_then_sync_job_cancels_its_sync() -> None:
    state = state_after(Event.WRITE_THEN_SYNC, Event.WRITE_FAILED)
    assert state.idle and state.health is Health.OPEN


def test_a_write_overlaps_a_running_sync() -> None:
    state = state_after(Event.SYNC, Event.WRITE)
    assert (state.writer, state.syncer) == (Stage.WRITING, Stage.SYNCING)
    state.process(Event.WRITTEN)  # the write-only job's: the sync runs on
    assert (state.writer, state.syncer) == (Stage.IDLE, Stage.SYNCING)
    state.process(Event.WRITE)
    state.process(Event.SYNCED)
    assert (state.writer, state.syncer) == (Stage.WRITING, Stage.IDLE)


def test_a_failed_sync_takes_the_pipeline_offline_for_good() -> None:
    state = state_after(Event.SYNC, Event.SYNC_FAILED)
    assert state.health is Health.OFFLINE and state.idle
    for start in (Event.WRITE, Event.SYNC, Event.WRITE_THEN_SYNC):
        with pytest.raises(IllegalTransition, match="health=offline"):
            state.process(start)
    state.process(Event.SHUT)
    assert state.health is Health.SHUT


def test_jobs_already_running_may_finish_after_the_pipeline_went_offline() -> None:
    state = state_after(Event.SYNC, Event.WRITE, Event.FAIL)
    state.process(Event.WRITTEN)
    state.process(Event.SYNCED)
    assert state.idle and state.health is Health.OFFLINE


@pytest.mark.parametrize(
    ("events", "illegal"),
    [
        pytest.param((), Event.WRITTEN, id="written-with-nothing-writing"),
        pytest.param((), Event.SYNCED, id="synced-with-nothing-syncing"),
        pytest.param((), Event.WRITE_FAILED, id="write-failed-with-nothing-writing"),
        pytest.param((Event.WRITE,), Event.WRITE, id="two-writes-at-once"),
        pytest.param((Event.SYNC,), Event.SYNC, id="two-syncs-at-once"),
        pytest.param((Event.SYNC,), Event.WRITE_THEN_SYNC, id="write-then-sync-during-a-sync"),
        pytest.param((Event.WRITE,), Event.WRITE_THEN_SYNC, id="write-then-sync-during-a-write"),
        pytest.param((Event.WRITE_THEN_SYNC,), Event.SYNC, id="sync-while-one-awaits-its-write"),
        pytest.param((Event.WRITE_THEN_SYNC,), Event.SYNCED, id="synced-before-written"),
        pytest.param((Event.WRITE,), Event.SHUT, id="shut-while-writing"),
        pytest.param((Event.SYNC,), Event.SHUT, id="shut-while-syncing"),
        pytest.param((Event.SHUT,), Event.WRITE, id="write-after-shut"),
        pytest.param((Event.SHUT,), Event.FAIL, id="fail-after-shut"),
    ],
)
def test_illegal_moves_are_refused_and_change_nothing(
    events: tuple[Event, ...], illegal: Event
) -> None:
    state = state_after(*events)
    before = repr(state)
    with pytest.raises(IllegalTransition) as info:
        state.process(illegal)
    assert illegal.value in str(info.value)
    assert repr(state) == before


def _reference(state: tuple[Stage, Stage, Health], event: Event) -> tuple[Stage, Stage, Health]:
    """The rules, written out as prose would say them (not as the table does)."""
    writer, syncer, health = state
    starting = event in (Event.WRITE, Event.WRITE_THEN_SYNC, Event.SYNC)
    if health is Health.SHUT or (starting and health is not Health.OPEN):
        raise IllegalTransition(event.value)
    if event is Event.WRITE:
        if writer is not Stage.IDLE:
            raise IllegalTransition(event.value)
        return Stage.WRITING, syncer, health
    if event is Event.WRITE_THEN_SYNC:
        if writer is not Stage.IDLE or syncer is not Stage.IDLE:
            raise IllegalTransition(event.value)
        return Stage.WRITING, Stage.AWAITING_WRITE, health
    if event is Event.SYNC:
        if syncer is not Stage.IDLE:
            raise IllegalTransition(event.value)
        return writer, Stage.SYNCING, health
    if event in (Event.WRITTEN, Event.WRITE_FAILED):
        if writer is not Stage.WRITING:
            raise IllegalTransition(event.value)
        if syncer is Stage.AWAITING_WRITE:
            syncer = Stage.SYNCING if event is Event.WRITTEN else Stage.IDLE
        return Stage.IDLE, syncer, health
    if event in (Event.SYNCED, Event.SYNC_FAILED):
        if syncer is not Stage.SYNCING:
            raise IllegalTransition(event.value)
        return writer, Stage.IDLE, Health.OFFLINE if event is Event.SYNC_FAILED else health
    if event is Event.FAIL:
        return writer, syncer, Health.OFFLINE
    assert event is Event.SHUT
    if writer is not Stage.IDLE or syncer is not Stage.IDLE:
        raise IllegalTransition(event.value)
    return writer, syncer, Health.SHUT


@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_the_table_agrees_with_the_rules_for_any_sequence_of_events(events: list[Event]) -> None:
    state = FlushState()
    model = (Stage.IDLE, Stage.IDLE, Health.OPEN)
    for event in events:
        try:
            expected = _reference(model, event)
        except IllegalTransition:
            with pytest.raises(IllegalTransition):
                state.process(event)
            continue
        state.process(event)
        model = expected
        assert (state.writer, state.syncer, state.health) == model
        # the sync stage only ever waits for a write that is running
        assert state.syncer is not Stage.AWAITING_WRITE or state.writer is Stage.WRITING


# --------------------------------------------------------------------------- Pipeline


@pytest.fixture
def segments(tmp_path: Path) -> Iterator[list[Segment]]:
    segs = [Segment.create(tmp_path, 0, index_interval_bytes=4096)]
    yield segs
    for seg in segs:
        seg.close()


def account(seg: Segment, pipeline: Pipeline, count: int = 1) -> int:
    """Account one batch of ``count`` records at the end of ``seg`` and queue it."""
    batch = records.encode_values([b"v"] * count, timestamp=1)
    head = records.stamp_header(batch, seg.next_offset, 0)
    header = records.validate_batch(head + batch[records.HEADER_SIZE :])
    position = seg.reserve([header])
    pipeline.queue_run(seg, position, seg.next_offset).extend([head, batch[records.HEADER_SIZE :]])
    return seg.next_offset


def checkpoint_of(mark: Mark) -> Checkpoint:
    offset, segment, position = mark
    return new_checkpoint(segment, position, offset, [])


def new_pipeline(segments: list[Segment], interval_ms: int = 1000) -> Pipeline:
    return Pipeline(segments, checkpoint_interval_ms=interval_ms, cache_window_bytes=0, now_ms=0)


def test_a_lone_append_is_one_write_then_sync_job(segments: list[Segment]) -> None:
    pipeline = new_pipeline(segments)
    end = account(segments[0], pipeline, 3)
    (job,) = pipeline.start_jobs(0, checkpoint_of)
    assert job.kind is Event.WRITE_THEN_SYNC
    assert job.plan is not None and job.plan.segments == segments
    assert pipeline.start_jobs(0, checkpoint_of) == []  # both stages are taken
    assert pipeline.write_succeeded(job) == end == pipeline.written_offset
    assert pipeline.flushed_offset == 0  # written, not yet synced
    assert pipeline.sync_finished(job, None)
    assert pipeline.flushed_offset == end
    assert pipeline.idle and pipeline.start_jobs(0, checkpoint_of) == []


def test_appends_during_a_sync_are_written_at_once_and_synced_next(
    segments: list[Segment],
) -> None:
    pipeline = new_pipeline(segments)
    seg = segments[0]
    account(seg, pipeline)
    (first,) = pipeline.start_jobs(0, checkpoint_of)
    pipeline.write_succeeded(first)  # now syncing
    end = account(seg, pipeline, 2)
    (write,) = pipeline.start_jobs(0, checkpoint_of)
    assert write.kind is Event.WRITE  # the syncer is busy: write only
    assert pipeline.write_succeeded(write) == end
    assert pipeline.start_jobs(0, checkpoint_of) == []  # the next sync waits for this one
    pipeline.sync_finished(first, None)
    assert pipeline.flushed_offset == 1
    (sync,) = pipeline.start_jobs(0, checkpoint_of)
    assert sync.kind is Event.SYNC and sync.target[0] == end
    assert sync.plan is not None and sync.plan.segments == [seg]
    pipeline.sync_finished(sync, None)
    assert pipeline.flushed_offset == end and pipeline.idle


def test_a_checkpoint_rides_with_the_first_job_after_the_interval(
    segments: list[Segment],
) -> None:
    pipeline = new_pipeline(segments, interval_ms=1000)
    account(segments[0], pipeline)
    (job,) = pipeline.start_jobs(999, checkpoint_of)
    assert job.checkpoint is None
    pipeline.write_succeeded(job)
    pipeline.sync_finished(job, None)
    end = account(segments[0], pipeline)
    (job,) = pipeline.start_jobs(1000, checkpoint_of)
    assert job.checkpoint is not None
    assert (job.checkpoint.next_offset, job.checkpoint.position) == (end, segments[0].size)


def test_a_roll_is_sealed_and_its_directory_synced_before_its_data_counts(
    segments: list[Segment], tmp_path: Path
) -> None:
    pipeline = new_pipeline(segments)
    old = segments[0]
    account(old, pipeline)
    new = Segment.create(tmp_path, old.next_offset, index_interval_bytes=4096)
    segments.append(new)
    pipeline.rolled_away(old)
    assert pipeline.holds(old)
    end = account(new, pipeline)
    # a directory sync is owed: it starts at once, beside the write
    write, sync = pipeline.start_jobs(0, checkpoint_of)
    assert (write.kind, sync.kind) == (Event.WRITE, Event.SYNC)
    assert sync.plan is not None and sync.plan.dir_dirty and sync.plan.seal == []
    assert write.handed_checkpoint is not None  # a roll makes a checkpoint due
    pipeline.write_succeeded(write)
    pipeline.sync_finished(sync, None)
    assert pipeline.flushed_offset == 0  # that sync ran before the data was written
    (seal,) = pipeline.start_jobs(0, checkpoint_of)
    assert seal.plan is not None and seal.plan.seal == [old]
    assert set(seal.plan.segments) == {old, new}
    assert seal.checkpoint is write.handed_checkpoint
    pipeline.sync_finished(seal, None)
    assert (pipeline.flushed_offset, pipeline.flushed_segment) == (end, new.base_offset)
    assert not pipeline.holds(old)


def test_a_failed_write_of_a_write_then_sync_job_gives_its_sync_work_back(
    segments: list[Segment],
) -> None:
    pipeline = new_pipeline(segments)
    seg = segments[0]
    account(seg, pipeline)
    (job,) = pipeline.start_jobs(0, checkpoint_of)
    assert job.kind is Event.WRITE_THEN_SYNC
    pipeline.write_failed(job)
    assert pipeline.idle and pipeline.state.health is Health.OPEN
    assert pipeline.written_offset == 0
    assert pipeline.unsynced == [seg]  # owed again: the next job is a sync
    (sync,) = pipeline.start_jobs(0, checkpoint_of)
    assert sync.kind is Event.SYNC


def test_a_failed_sync_takes_it_offline_and_nothing_starts_again(
    segments: list[Segment],
) -> None:
    pipeline = new_pipeline(segments)
    account(segments[0], pipeline)
    (job,) = pipeline.start_jobs(0, checkpoint_of)
    pipeline.write_succeeded(job)
    assert not pipeline.sync_finished(job, OSError(5, "EIO"))
    assert pipeline.state.health is Health.OFFLINE and pipeline.failure is not None
    assert pipeline.flushed_offset == 0
    account(segments[0], pipeline)
    assert pipeline.start_jobs(0, checkpoint_of) == []


def test_a_job_reported_twice_is_refused(segments: list[Segment]) -> None:
    pipeline = new_pipeline(segments)
    account(segments[0], pipeline)
    (job,) = pipeline.start_jobs(0, checkpoint_of)
    pipeline.write_succeeded(job)
    pipeline.sync_finished(job, None)
    with pytest.raises(IllegalTransition):
        pipeline.sync_finished(job, None)
    with pytest.raises(IllegalTransition):
        pipeline.write_succeeded(Job(Event.WRITE, [], pipeline.log_end()))
