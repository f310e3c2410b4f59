"""The rules for a model process that dies, without processes: finding the inputs that kill the
model by running parts of a batch alone (with a fake runner standing for llama.cpp, which
cannot be made to crash on a chosen input here), remembering them, backing off restarts, and
the canary's choice of weight repacking (the SIGILL path needs a CPU with AMX)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from embedd.inference.canary import (
    REPACK_OFF_REASON,
    Attempt,
    LoadPlan,
    Refused,
    Verdict,
    Verdicts,
    cpu_flags,
    verdict_key,
)
from embedd.inference.crashes import (
    BACKOFF_MAX,
    Backoff,
    CulpritSearch,
    PoisonMemory,
    fingerprint,
)


def search_until_done(
    search: CulpritSearch[int], kills: Callable[[list[int]], bool]
) -> tuple[list[int], list[int], int]:
    """Run the search's groups one at a time with `kills` deciding whether the model dies;
    returns (culprits, inputs answered, groups run)."""
    culprits: list[int] = []
    answered: list[int] = []
    runs = 0
    while (group := search.next_group()) is not None:
        runs += 1
        assert runs < 200, "the search does not end"
        if kills(group):
            culprits += search.crashed()
        else:
            answered += group
            search.passed()
    assert not search
    return culprits, answered, runs


def test_a_single_input_that_killed_a_process_alone_is_the_culprit_at_once() -> None:
    search: CulpritSearch[int] = CulpritSearch()
    assert search.add([7], crashed_alone=True) == [7]
    assert not search


def test_one_poison_input_in_a_batch_of_64_is_found_and_every_other_input_answered() -> None:
    search: CulpritSearch[int] = CulpritSearch()
    batch = list(range(64))
    assert search.add(batch, crashed_alone=True) == []
    culprits, answered, runs = search_until_done(search, lambda group: 41 in group)
    assert culprits == [41]
    assert sorted(answered) == [i for i in batch if i != 41]
    assert runs <= 2 * 6  # two halves per level, six levels


def test_two_poison_inputs_are_both_found() -> None:
    search: CulpritSearch[int] = CulpritSearch()
    search.add(list(range(10)), crashed_alone=True)
    culprits, answered, _ = search_until_done(search, lambda g: 2 in g or 9 in g)
    assert sorted(culprits) == [2, 9]
    assert sorted(answered) == [0, 1, 3, 4, 5, 6, 7, 8]


def test_a_batch_that_crashed_beside_others_first_runs_whole_and_alone() -> None:
    """Two batches were computing when the process died: either may be innocent."""
    search: CulpritSearch[int] = CulpritSearch()
    assert search.add([1, 2, 3], crashed_alone=False) == []
    assert search.next_group() == [1, 2, 3]
    search.passed()
    assert not search


def test_an_innocent_single_input_is_not_blamed_for_a_crash_beside_others() -> None:
    search: CulpritSearch[int] = CulpritSearch()
    assert search.add([5], crashed_alone=False) == []
    culprits, answered, _ = search_until_done(search, lambda group: False)
    assert (culprits, answered) == ([], [5])


def test_a_group_that_could_not_start_runs_next() -> None:
    search: CulpritSearch[int] = CulpritSearch()
    search.add([1, 2, 3, 4], crashed_alone=True)
    group = search.next_group()
    assert group is not None
    search.put_back(group)
    assert search.next_group() == group
    assert sorted(search.pending()) == [1, 2, 3, 4]


def test_the_poison_memory_knows_an_input_by_its_tokens_and_the_signal() -> None:
    memory = PoisonMemory()
    memory.add([101, 7, 102], "SIGSEGV")
    assert memory.killed_by([101, 7, 102]) == "SIGSEGV"
    assert memory.killed_by([101, 8, 102]) is None


def test_the_poison_memory_is_bounded_and_forgets_the_least_recent() -> None:
    memory = PoisonMemory(limit=3)
    for i in range(3):
        memory.add([i], "SIGABRT")
    assert memory.killed_by([0]) == "SIGABRT"  # 0 is now the most recent
    memory.add([3], "SIGABRT")
    assert len(memory) == 3
    assert memory.killed_by([1]) is None
    assert memory.killed_by([0]) == "SIGABRT"


def test_fingerprints_differ_for_different_token_ids() -> None:
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    assert fingerprint([1, 2]) == fingerprint([1, 2])


def test_the_first_restart_is_immediate_and_later_ones_back_off_to_a_cap() -> None:
    backoff = Backoff(first=0.25, cap=BACKOFF_MAX)
    delays = []
    for _ in range(10):
        backoff.died()
        delays.append(backoff.delay())
    assert delays[:4] == [0.0, 0.25, 0.5, 1.0]
    assert max(delays) == BACKOFF_MAX
    assert delays == sorted(delays)


def test_a_computed_batch_ends_the_streak() -> None:
    backoff = Backoff()
    backoff.died()
    backoff.died()
    backoff.progressed()
    backoff.died()
    assert (backoff.streak, backoff.delay()) == (1, 0.0)


def test_without_a_verdict_the_model_loads_repacked_and_runs_the_canary() -> None:
    plan = LoadPlan(None)
    assert plan.first() == Attempt(repack=True, canary=True)
    assert plan.passed() == Verdict(True, False, "passed the canary")
    assert plan.repacking == "on"


def test_sigill_with_repacking_on_loads_again_with_it_off_and_keeps_that_verdict() -> None:
    plan = LoadPlan(None)
    plan.first()
    assert plan.died("SIGILL", "computing its first batch with", "m.gguf") == Attempt(
        repack=False, canary=True
    )
    assert plan.passed() == Verdict(False, False, REPACK_OFF_REASON)
    assert plan.repacking.startswith("off: llama.cpp died by SIGILL")


def test_sigill_with_repacking_off_too_refuses_the_model_naming_the_signal() -> None:
    plan = LoadPlan(None)
    plan.first()
    plan.died("SIGILL", "loading", "m.gguf")
    refused = plan.died("SIGILL", "computing its first batch with", "m.gguf")
    assert isinstance(refused, Refused)
    assert "SIGILL" in refused.reason and "repacking off as well" in refused.reason
    assert plan.refusal_to_keep(refused, "SIGILL") == Verdict(False, True, refused.reason)


def test_another_death_while_loading_refuses_without_remembering_it() -> None:
    plan = LoadPlan(None)
    plan.first()
    refused = plan.died("SIGSEGV", "loading", "m.gguf")
    assert isinstance(refused, Refused) and "SIGSEGV" in refused.reason
    assert plan.refusal_to_keep(refused, "SIGSEGV") is None


def test_a_kept_verdict_skips_the_canary() -> None:
    off = LoadPlan(Verdict(False, False, REPACK_OFF_REASON))
    assert off.first() == Attempt(repack=False, canary=False)
    assert off.repacking == f"off: {REPACK_OFF_REASON}"
    refused = LoadPlan(Verdict(False, True, "dies by SIGILL"))
    assert refused.first() == Refused("dies by SIGILL")


def test_verdicts_are_kept_on_disk_per_key(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    kept = Verdicts(path)
    key = verdict_key("sha", "build", "AVX2 = 1", cpu_flags())
    assert kept.get(key) is None
    kept.put(key, Verdict(False, False, "why"))
    assert Verdicts(path).get(key) == Verdict(False, False, "why")
    assert Verdicts(path).get(verdict_key("sha", "another build", "AVX2 = 1", cpu_flags())) is None


def test_an_unreadable_verdict_file_means_no_verdict(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    path.write_text("{not json")
    assert Verdicts(path).get("k") is None
