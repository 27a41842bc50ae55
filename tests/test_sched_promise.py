"""Issue 13's remaining promises, pinned on fixed traces: the tail, rent or buy, serial awareness
from measured overlap, prefetch. Pure decisions on known snapshots, then whole runs of the engine
on the virtual clock (gpuctx.sim), which are deterministic."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctx import policy
from gpuctx.policy import ABSENT, RESIDENT, PolicyParams, SlotView, Snapshot, Start, plan, should_yield
from gpuctx.sim import SimModel, SimTask, simulate
from gpuctx.trace import Trace

from test_policy import apply, snapshots

G = 10**9


def view(name, size, **kw):
    return SlotView(name=name, size=size * G, **kw)


# -- the tail: a group past its quantum finishes a short remainder instead of yielding ------------

def _tail_snapshot(now: float, queued: int) -> Snapshot:
    # r runs since 0 (patience 30 s: max_wait), one task per second; w waits since 0.5, urgent.
    return Snapshot(now=now, budget=4 * G, slots=(
        view("r", 3, state=RESIDENT, used=3 * G, busy=True, queued=queued, started=0.0, waiting_since=0.0,
             run_cost=1.0),
        view("w", 3, queued=5, oldest=0.5, waiting_since=0.5),
    ))


def test_a_tail_that_ends_within_twice_the_patience_is_finished_then_the_group_yields():
    assert policy.in_quantum(_tail_snapshot(29.0, 40).slots[0], 29.0, PolicyParams())   # the quantum itself
    assert not should_yield(_tail_snapshot(31.0, 5), "r")      # 31 + 5 <= 60: finishing saves a switch back
    assert should_yield(_tail_snapshot(31.0, 40), "r")         # 31 + 40 > 60: it yields at once
    assert should_yield(_tail_snapshot(61.0, 1), "r")          # the hard end: never past 2 x patience
    unmeasured = replace(_tail_snapshot(31.0, 5), slots=(replace(_tail_snapshot(31.0, 5).slots[0], run_cost=0.0),
                                                         _tail_snapshot(31.0, 5).slots[1]))
    assert should_yield(unmeasured, "r")                       # no measured run time: no tail


def _interactive(budget_gb: float):
    """60 one-second batch calls alternating a (4 GB) / b (3 GB), all at 0; 10 priority-5 calls
    (0.5 s) to b every 4 s from t=2. Loads take 1 s per GB."""
    models = [SimModel("a", 4 * G, 4.0), SimModel("b", 3 * G, 3.0)]
    tasks = [SimTask(i, "ab"[i % 2], 0.0, 1.0) for i in range(60)]
    tasks += [SimTask(60 + k, "b", 2.0 + 4 * k, 0.5, priority=5) for k in range(10)]
    return models, tasks, int(budget_gb * G)


def test_interactive_calls_preempt_the_batch_once_and_the_batch_costs_no_more_switches():
    models, tasks, budget = _interactive(4.5)          # a and b never fit together
    r = simulate(models, tasks, budget)
    # a, then b (pre-empted in by the first interactive call: it keeps b's batch and every later
    # interactive call), then a again: 3 loads; the seed's 2 never pre-empt, the starting engine made 5.
    assert r.sequence == [("load", "a"), ("unload", "a"), ("load", "b"), ("unload", "b"), ("load", "a")]
    latency = {t.arrival: r.end[t.id] - t.arrival for t in tasks if t.priority == 5}
    # The first waits for a's load to end (4 s), b's load (3 s) and runs (0.5 s); the next ones at
    # most one batch call (the one at 6, the first's 0.5 s as well). From t=30 b's own batch calls have waited max_wait (30 s) in its queue:
    # they go first (the per-task starvation bound), 11 s at most for the 3 calls that arrive then.
    assert latency[2.0] == (4.0 - 2.0) + 3.0 + 0.5
    assert latency[6.0] == 7.0 + 0.5 + 0.5 - 6.0
    assert all(v <= 1.0 + 0.5 for k, v in latency.items() if 6.0 < k < 30.0)
    assert max(latency.values()) <= 11.0
    assert simulate(models, tasks, budget).start == r.start      # deterministic


def test_the_seed_pipeline_at_its_tight_budget_loads_each_model_once():
    # Whisper 4.5 GB, VideoMAE 5.0, CLAP 2.0, DINOv3 1.0, Qwen3 1.5 after that clip's Whisper and
    # CLAP; 20 clips at once; 5.4 GB: at most CLAP + DINOv3 + Qwen3 together. Before the tail the
    # 30 s floor of the patience cut Whisper's 40 s backlog and VideoMAE's 30 s: 7 loads.
    spec = [("whisper", 4.5, 2.0), ("videomae", 5.0, 1.5), ("clap", 2.0, 0.5), ("dinov3", 1.0, 0.3)]
    models = [SimModel(n, int(gb * G), gb) for n, gb, _ in spec] + [SimModel("qwen3", int(1.5 * G), 1.5)]
    tasks: list[SimTask] = []
    for _ in range(20):
        ids = {}
        for n, _, run in spec:
            ids[n] = len(tasks)
            tasks.append(SimTask(len(tasks), n, 0.0, run))
        tasks.append(SimTask(len(tasks), "qwen3", 0.0, 1.0, deps=(ids["whisper"], ids["clap"])))
    r = simulate(models, tasks, int(5.4 * G))
    assert r.loads == 5 and r.peak <= int(5.4 * G)


# -- rent or buy: a start that must evict waits as long as the switches it causes ------------------

def _evicting(now: float, oldest: float, queued: int = 1, **kw) -> Snapshot:
    return Snapshot(now=now, budget=4 * G, slots=(
        view("a", 3, state=RESIDENT, used=3 * G, load_cost=2.0, unload_cost=0.5),
        view("b", 3, queued=queued, oldest=oldest, load_cost=1.0, **kw),
    ))


def test_an_evicting_start_waits_until_its_work_has_waited_the_switches_it_costs():
    # b's load 1 s + a's reload and unload 2.5 s = 3.5 s; one task waiting since 10.
    snap = _evicting(11.0, 10.0)
    assert plan(snap) == [] and policy.plan_wake(snap)[1] == 13.5
    assert plan(_evicting(13.5, 10.0)) == [Start("b", ("a",), 3 * G)]
    assert policy.plan_wake(_evicting(11.0, 10.0, queued=7))[1] == 13.5   # the group's wait, however many
    # Never for an urgent group (patience 30 s), nor for a strictly higher class than the victim's work.
    assert plan(_evicting(40.1, 10.0)) == [Start("b", ("a",), 3 * G)]
    hi = Snapshot(now=11.0, budget=4 * G, slots=(
        view("a", 3, state=RESIDENT, used=3 * G, queued=2, load_cost=2.0),
        view("b", 3, queued=1, oldest=10.0, head_priority=5)))
    assert plan(hi) == [Start("b", ("a",), 3 * G)]
    # No victim needed: no wait at all.
    free = Snapshot(now=10.0, budget=8 * G, slots=_evicting(10.0, 10.0).slots)
    assert plan(free) == [Start("b", (), 3 * G)]


def test_a_deferred_start_is_made_by_the_engine_itself_when_nothing_else_happens():
    # a runs at 0 (1 s load, 0.1 s run) and stays resident, idle; b's only call arrives at 2 and
    # needs a's memory. Nothing else ever happens: only the engine's own re-plan can start it,
    # at 2 + (b's load, estimated from a's measured rate: 1 s, + a's reload: 1 s) = 4, then 1 s load.
    models = [SimModel("a", 3 * G, 1.0), SimModel("b", 3 * G, 1.0)]
    tasks = [SimTask(0, "a", 0.0, 0.1), SimTask(1, "b", 2.0, 0.1)]
    r = simulate(models, tasks, 4 * G)
    assert abs(r.start[1] - 5.0) < 1e-6
    assert r.sequence == [("load", "a"), ("unload", "a"), ("load", "b")]


def test_rent_or_buy_keeps_two_interleaved_models_from_evicting_each_other_per_call():
    # a is resident and idle; calls alternate b (at 2.5, 3.5, ...) and a (at 3, 4, ...), the two
    # never fit together, a load takes 2 s. Evicting a for b's first call at once, as before, then
    # a's next call evicts b: 4 loads. Waiting the switches b's start costs (2 + 2 s), a serves its
    # calls meanwhile and b then serves all of its own: 2 loads, the lower bound, and sooner.
    models = [SimModel("a", 3 * G, 2.0), SimModel("b", 3 * G, 2.0)]
    tasks = [SimTask(0, "a", 0.0, 0.1)]
    for k in range(4):
        tasks.append(SimTask(len(tasks), "b", 2.5 + 1.0 * k, 0.1))
        tasks.append(SimTask(len(tasks), "a", 3.0 + 1.0 * k, 0.1))
    r = simulate(models, tasks, 4 * G)
    assert r.sequence == [("load", "a"), ("unload", "a"), ("load", "b")]
    assert abs(r.start[1] - (2.5 + 4.0 + 2.0)) < 1e-6 and r.makespan < 9.0


# -- measured overlap, and the serial GPU --------------------------------------------------------

class _Run:
    _ids = iter(range(10**6))

    def __init__(self, model: str, start: float, end: float) -> None:
        self.id, self.name, self.model = next(self._ids), model, model
        self.submitted_at, self.started_at, self.ended_at = start, start, end


def _trace(runs) -> Trace:
    tr = Trace()
    events = sorted([(a, 1, _Run(m, a, b)) for m, a, b in runs], key=lambda e: e[0])
    order = [(x.started_at, 0, x) for _, _, x in events] + [(x.ended_at, 1, x) for _, _, x in events]
    for _, kind, x in sorted(order, key=lambda e: (e[0], e[1])):
        (tr.ended if kind else lambda t: tr.started(t, t.model))(x)
    return tr


def test_stats_measure_the_overlap_of_runs():
    ov = _trace([("a", 0.0, 1.0), ("b", 0.5, 1.5), ("c", 3.0, 4.0)]).stats.as_dict()["overlap"]
    assert (ov["run_seconds"], ov["busy_seconds"], ov["overlap_seconds"]) == (3.0, 2.5, 0.5)
    assert abs(ov["concurrency"] - 1.2) < 1e-9


def test_runs_that_look_concurrent_but_were_serialised_measure_as_serial():
    # x and y alone take 1 s each; together each took 2 s (one GPU queued them): no real overlap.
    serial = _trace([("x", 0.0, 1.0), ("x", 2.0, 4.0), ("y", 2.0, 4.0), ("y", 5.0, 6.0)]).stats
    assert abs(serial.real_concurrency() - 1.0) < 1e-9
    overlapped = _trace([("x", 0.0, 1.0), ("x", 2.0, 3.0), ("y", 2.0, 3.0), ("y", 5.0, 6.0)]).stats
    assert abs(overlapped.real_concurrency() - 4 / 3) < 1e-9
    assert _trace([("x", 0.0, 1.0), ("y", 2.0, 3.0)]).stats.real_concurrency() is None   # never concurrent


def test_a_run_alone_is_counted_as_the_sweep_counts_it():
    # a run that ends with nothing else open skips _fold's sweep: the totals must be the sweep's
    import random

    rng = random.Random(7)
    # and a long run still open when 64 short ones were folded in a piece: it ends alone, after the cut
    cases = [[("x", 0.0, 100.0)] + [("y", float(i), i + 0.5) for i in range(1, 65)]]
    for _ in range(50):
        runs, t = [], 0.0
        for _ in range(rng.randint(1, 150)):
            t += rng.choice((0.0, 0.3, 1.5))                  # back to back, overlapping, or apart
            runs.append((rng.choice("xyz"), t, t + rng.uniform(0.1, 2.0)))
        cases.append(runs)
    for runs in cases:
        fast = _trace(runs).stats
        slow = _trace_swept(runs).stats
        for key in ("run_seconds", "busy_seconds", "overlap_seconds", "concurrency", "effective_concurrency"):
            assert abs(fast.overlap()[key] - slow.overlap()[key]) < 1e-9, (key, runs)
        assert fast._solo == slow._solo and fast._runs == slow._runs
        assert fast.real_concurrency() == slow.real_concurrency()


def _trace_swept(runs) -> Trace:
    from gpuctx.trace import Stats

    class Swept(Stats):
        def _run_ended(self, started, ended, model=None):
            self._open -= 1
            self._period.append((started, ended, model))
            if self._open <= 0 or len(self._period) >= 64:
                self._fold()

    import gpuctx.trace as tr_mod
    saved, tr_mod.Stats = tr_mod.Stats, Swept
    try:
        return _trace(runs)
    finally:
        tr_mod.Stats = saved


def _three_small(serial: bool):
    models = [SimModel(n, 1 * G, 0.5) for n in "xyz"]
    tasks = [SimTask(i, "xyz"[i % 3], 0.0, 0.2 + 0.1 * (i % 2)) for i in range(30)] + \
        [SimTask(30 + i, "xyz"[i % 3], 10.0 + 0.2 * i, 0.2) for i in range(12)]
    return simulate(models, tasks, 8 * G, serial=serial)


def test_the_simulated_one_gpu_mode_is_measured_as_serial_and_concurrent_runs_as_concurrent():
    assert _three_small(True).overlap["effective_concurrency"] < policy.SERIAL_BELOW
    assert _three_small(False).overlap["effective_concurrency"] > 1.5


def test_when_runs_are_measured_serial_a_second_group_does_not_load_while_one_runs():
    base = Snapshot(now=10.0, budget=8 * G, slots=(
        view("r", 3, state=RESIDENT, used=3 * G, busy=True, queued=3, started=9.0),
        view("w", 3, queued=2, oldest=9.5),
        view("idle", 1, state=RESIDENT, used=1 * G, queued=1, oldest=9.5)))
    assert {s.slot for s in plan(base)} == {"w", "idle"}                               # unknown: overlap assumed
    assert {s.slot for s in plan(replace(base, concurrency=2.0))} == {"w", "idle"}
    assert {s.slot for s in plan(replace(base, concurrency=1.0))} == {"idle"}          # resident: no load
    urgent = replace(base, now=40.0, concurrency=1.0)
    assert "w" in {s.slot for s in plan(urgent)}                                       # the bound still holds


# -- prefetch ------------------------------------------------------------------------------------

def test_prefetch_loads_a_model_whose_work_waits_on_running_tasks_into_free_memory_only():
    running = view("a", 3, state=RESIDENT, used=3 * G, busy=True, queued=2, started=0.0)
    nxt = view("b", 2, pending=4)
    snap = Snapshot(now=1.0, budget=6 * G, slots=(running, nxt))
    assert policy.prefetch(snap, plan(snap)) == Start("b", (), 2 * G)
    two = replace(snap, slots=snap.slots + (view("c", 2, pending=1),))
    assert policy.prefetch(two, plan(two)) is None                               # which first is a guess
    tight = replace(snap, budget=4 * G)
    assert policy.prefetch(tight, plan(tight)) is None                           # would need an eviction
    waiting = replace(snap, slots=snap.slots + (view("d", 5, queued=1, oldest=0.5),))
    assert policy.prefetch(waiting, plan(waiting)) is None                       # a ready group comes first
    loaded = replace(snap, slots=(running, replace(nxt, state=RESIDENT, used=2 * G)))
    assert policy.prefetch(loaded, plan(loaded)) is None


@settings(max_examples=300, derandomize=True, deadline=None)
@given(snapshots())
def test_prefetch_never_takes_the_budget_past_its_limit(snapshot):
    starts = plan(snapshot)
    ahead = policy.prefetch(snapshot, starts)
    charges = apply(snapshot, starts + ([ahead] if ahead else []))
    assert sum(charges.values()) <= snapshot.budget or ahead is None
    if ahead is not None:
        s = next(v for v in snapshot.slots if v.name == ahead.slot)
        assert not ahead.evict and s.pending and not s.queued and s.state in (ABSENT, policy.OFFLOADED)
        before = apply(snapshot, starts)
        assert sum(before.values()) + ahead.need <= snapshot.budget


def test_prefetch_takes_the_next_models_load_off_the_critical_path():
    # a (2 s load) runs one 1 s task; b's task depends on it; both fit. Without prefetch b loads
    # once its task is ready (3 + 3 s load + 1 s run = 7); with it b loads alongside a: done at 4.
    models = [SimModel("a", 2 * G, 2.0), SimModel("b", 3 * G, 3.0)]
    tasks = [SimTask(0, "a", 0.0, 1.0), SimTask(1, "b", 0.0, 1.0, deps=(0,))]
    with_pf, without = simulate(models, tasks, 6 * G, prefetch=True), simulate(models, tasks, 6 * G)
    assert (with_pf.makespan, without.makespan) == (4.0, 7.0)
    assert with_pf.prefetches == 1 and without.prefetches == 0
    assert with_pf.loads == without.loads == 2 and with_pf.peak <= 6 * G


# -- weighted eviction: what a miss costs, streams, and a cheaper victim that is running ---------

def test_a_stream_of_calls_is_expected_again_and_a_burst_is_not():
    assert policy.expected(last_arrival=10.0, gap=3.0, now=18.9)          # within 3 mean gaps
    assert not policy.expected(last_arrival=10.0, gap=3.0, now=19.1)      # the stream stopped
    assert not policy.expected(last_arrival=0.0, gap=1e-6, now=0.1)       # a burst: over at once
    assert not policy.expected(last_arrival=0.0, gap=None, now=0.0)       # one call is no stream
    assert policy.next_use(0, 0, expected=True) == 1.0 and policy.next_use(0, 0) == float("inf")


def test_among_models_used_again_the_cheapest_to_switch_back_goes_first():
    whisper = view("whisper", 4.5, state=RESIDENT, used=int(4.5 * G), load_cost=4.5, last_used=1.0, next_use=1.0)
    tts = view("tts", 2, state=RESIDENT, used=2 * G, load_cost=2.0, last_used=5.0, next_use=0.0)
    # Both used again: tts (2 s back) rather than Whisper (4.5 s), though tts has ready work and was used last.
    assert policy.choose_victims([whisper, tts], 2 * G) == ("tts",)
    # Whisper never used again (inf): it goes, whatever it costs (Belady).
    assert policy.choose_victims([replace(whisper, next_use=float("inf")), tts], 2 * G) == ("whisper",)
    # At equal cost, the one used furthest ahead.
    near = replace(whisper, name="near", load_cost=2.0, size=2 * G, used=2 * G, next_use=0.0, last_used=0.0)
    far = replace(near, name="far", next_use=1.0, last_used=9.0)
    assert policy.choose_victims([near, far], 2 * G) == ("far",)


def _chat_medium(now: float, tts_since: float) -> Snapshot:
    # Whisper (4.5 GB) idle, the LLM (1.5 GB) running, tts (2 GB) waits: 6.5 GB, tts needs 2.
    return Snapshot(now=now, budget=int(6.5 * G), slots=(
        view("whisper", 4.5, state=RESIDENT, used=int(4.5 * G), load_cost=4.5, next_use=1.0),
        view("llm", 1.5, state=RESIDENT, used=int(1.5 * G), load_cost=1.5, busy=True, queued=2, started=now - 1,
             waiting_since=now - 1, run_cost=1.5),
        view("tts", 2, queued=3, oldest=tts_since, load_cost=2.0),
    ))


def test_a_start_waits_for_a_cheaper_running_victim_instead_of_evicting_a_dearer_idle_one():
    # Evicting Whisper now costs its 4.5 s reload; the LLM's group ends soon and costs 1.5 s back.
    snap = _chat_medium(20.0, 10.0)
    # No start; the engine plans again by itself at tts's patience (10 + 30 s), if the LLM's group
    # has not ended by then (its end plans again too).
    assert plan(snap) == [] and policy.plan_wake(snap)[1] == 40.0
    # With the LLM idle, the plan evicts it, not Whisper.
    idle = replace(snap, slots=(snap.slots[0], replace(snap.slots[1], busy=False, started=None, queued=0, next_use=1.0),
                                snap.slots[2]))
    assert plan(idle) == [Start("tts", ("llm",), 2 * G)]
    # The starvation bound: once tts has waited its patience (30 s), it evicts Whisper at once.
    assert plan(_chat_medium(40.1, 10.0)) == [Start("tts", ("whisper",), 2 * G)]
    # A strictly higher class pre-empts the cheap running group at its next task boundary
    # (should_yield) rather than evict the idle Whisper.
    hi = replace(snap, slots=snap.slots[:2] + (replace(snap.slots[2], head_priority=5),))
    assert plan(hi) == [] and should_yield(hi, "llm")
    assert not should_yield(snap, "llm")          # an equal class does not pre-empt


def test_waiting_for_a_cheaper_running_victim_ends_at_the_patience_even_if_its_task_does_not():
    # big (4 GB, 4 s to load) idle and used again; small (1 GB) runs one 100 s call; c (1 GB)
    # arrives at 2 and needs room (budget 5 GB). Waiting for small's group to end would take 98 s:
    # c waits its patience (30 s) and evicts big, by the engine's own re-plan at 32.
    models = [SimModel("big", 4 * G, 4.0), SimModel("small", 1 * G, 1.0), SimModel("c", 1 * G, 1.0)]
    tasks = [SimTask(0, "big", 0.0, 0.1), SimTask(1, "small", 0.0, 100.0), SimTask(2, "c", 2.0, 0.1),
             SimTask(3, "big", 2.0, 0.1, deps=(1,))]
    r = simulate(models, tasks, 5 * G)
    assert abs(r.start[2] - (2.0 + 30.0 + 1.0)) < 1e-6, r.start   # its patience, then its 1 s load
    assert ("unload", "big") in r.sequence


def test_the_chat_trace_at_the_medium_budget_keeps_whisper_while_conversations_arrive():
    # Every two of the three models fit, all three do not. Before the weighted eviction, the
    # three rotated: Whisper (4.5 s to load) was evicted 4 times, 33.5 s of loads in 13. Now the
    # LLM and the TTS take turns beside it: 2 (one where the arrivals pause), 28 s in 13.
    models, tasks = _chat(0, 0.0)
    r = simulate(models, tasks, int(6.5 * G))
    cost = {m.name: m.load_s for m in models}
    assert r.sequence.count(("unload", "asr")) <= 2 and r.loads <= 13, r.sequence
    assert sum(cost[m] for kind, m in r.sequence if kind == "load") <= 28.0 + 1e-9


# -- robustness to timing noise ------------------------------------------------------------------

def _chat(seed: int, jitter: float):
    """The benchmark's chat trace (40 Poisson arrivals, mean gap 3 s: ASR 1 s -> LLM 1.5 s -> TTS
    0.8 s), every load, run and arrival stretched by a random factor up to ``1 + jitter`` (sleeps
    on a busy machine overshoot, never undershoot)."""
    import random

    arrivals, rng = random.Random(1), random.Random(seed)
    stretch = lambda x, j=jitter: x * rng.uniform(1.0, 1.0 + j)  # noqa: E731
    models = [SimModel("asr", int(4.5 * G), stretch(4.5)), SimModel("llm", int(1.5 * G), stretch(1.5)),
              SimModel("tts", 2 * G, stretch(2.0))]
    tasks, t = [], 0.0
    for _ in range(40):
        t += arrivals.expovariate(1 / 3.0)
        a, at = len(tasks), stretch(t, jitter / 5)
        tasks += [SimTask(a, "asr", at, stretch(1.0)), SimTask(a + 1, "llm", at, stretch(1.5), deps=(a,)),
                  SimTask(a + 2, "tts", at, stretch(0.8), deps=(a + 1,))]
    return models, tasks


def test_loads_on_the_chat_trace_hardly_move_when_every_time_is_off_by_up_to_30_percent():
    # The live benchmark's repeats differ by such timing noise. Rent or buy on the group's wait
    # (not on queued x wait, which moved the start with every arrival) keeps the loads steady.
    loads = [simulate(*_chat(seed, 0.3), 5 * G).loads for seed in range(8)]
    assert max(loads) <= 1.1 * min(loads), loads


def test_shutdown_waits_for_a_deferred_start_and_returns():
    # Live engine, real threads: b's call must evict the idle a, so its start is deferred by the
    # switches it costs (~0.1 s); shutdown(wait=True) right after must still see it run and return
    # (the housekeeper that plans deferred starts must not stop at the shutdown before they ran).
    import threading
    import time

    from gpuctx.engine import Config, Scheduler, TaskSpec

    sched = Scheduler(Config(budget=4 * G, safety_factor=1.0, device="cpu", offload=False))
    for name in "ab":
        sched.register_model(name, lambda n=name: time.sleep(0.05) or n, vram=3 * G)
    call = {n: TaskSpec(fn=lambda: None, name=n, model=n) for n in "ab"}
    sched.submit(call["a"], (), {}).result(timeout=10)
    late = sched.submit(call["b"], (), {})
    done = threading.Thread(target=sched.shutdown, kwargs={"wait": True}, daemon=True)
    done.start()
    done.join(timeout=10)
    assert not done.is_alive() and late.done() and late.exception() is None
