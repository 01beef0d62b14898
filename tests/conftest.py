"""Shared fixtures, and the rule that keeps `make test-fast` (``-m "not slow"``) pure.

A test is marked ``slow`` here when it starts processes, servers or process groups but does not
say so itself: it requests (directly or through another fixture) one of `PROCESS_FIXTURES`, or
it is one of `PROCESS_TESTS`, which start them in their own body. New tests that start processes
mark themselves ``@pytest.mark.slow``; these tables cover fixtures shared by many tests and the
tests written before the fast tier existed.
"""

from __future__ import annotations

import faulthandler
import os

import pytest

SESSION_LIMIT_S = float(os.environ.get("TEST_SESSION_LIMIT_S", "1800"))
"""A whole run (or one xdist worker) that lasts longer is stuck somewhere pytest-timeout cannot
interrupt (a C call, a cleanup waiting on a dead child): every thread's traceback is printed and
the run exits with an error, instead of hanging until CI kills it with nothing to show."""


def pytest_sessionstart(session: pytest.Session) -> None:
    faulthandler.dump_traceback_later(SESSION_LIMIT_S, exit=True)

PROCESS_FIXTURES: frozenset[str] = frozenset({
    "pool4",  # below: four forked gloo ranks
    "pool2",  # two forked gloo ranks, where a module defines one
    "pools",  # test_checkpoint: a DistributedPool per world size
    "server",  # test_io_server, test_io_hardening: an io-server daemon (gRPC + worker processes)
    "servers",  # test_io_client: two io-server daemons
    "straight",  # test_keye_train: an uninterrupted torchrun run of the example
    "sft",  # test_keye_post_training: a torchrun SFT run
    "nccl_world",  # test_gpu*: an NCCL process group (TCP store)
})
"""Fixtures that start processes, servers or process groups. `item.fixturenames` is the closure
of what a test requests, so fixtures built on these (`stub`, `uninterrupted4`) are covered."""

PROCESS_TESTS: dict[str, frozenset[str]] = {
    # two `python -c` subprocesses compare plan digests
    "test_balancer": frozenset({"test_plans_identical_across_processes"}),
    # `python -m dataloader index --workers 2` (forked probers); a real io-server
    "test_dataloader_manifest": frozenset({
        "test_index_command_probes_in_parallel_and_reports_unreadable_files",
        "test_index_through_a_real_io_server_equals_local_probing",
    }),
    # a real io-server; forked gloo ranks that are SIGKILLed
    "test_dataloader_resume": frozenset({
        "test_fetching_through_a_real_io_server_gives_the_same_steps",
        "test_sigkill_mid_step_then_resume_on_two_ranks",
    }),
    # two io-servers started in the test, one SIGKILLed
    "test_io_client": frozenset({"test_sigkill_mid_stream_every_request_completes_exactly_once"}),
    # io-servers started in the test, a worker killed / the daemon SIGTERMed
    "test_io_server": frozenset({
        "test_a_crashed_worker_does_not_take_the_server_down",
        "test_sigterm_finishes_in_flight_refuses_new_and_exits_0",
    }),
    # builds the 8B model in a subprocess (meta device, gloo world of one)
    "test_keye_stages": frozenset({"test_keye_vl_8b_constructs_with_the_real_shapes"}),
}
"""Test module -> tests (function names, all parametrizations) that start processes, servers
or process groups in their own body."""


def starts_processes(item: pytest.Item) -> bool:
    """Whether ``item`` starts processes, servers or process groups by the tables above."""
    if not PROCESS_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())):
        return True
    name = getattr(item, "originalname", item.name)
    return name in PROCESS_TESTS.get(item.path.stem, frozenset())


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if starts_processes(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def pool4():
    """Four gloo ranks shared by the tests of one module."""
    from tests.distributed import DistributedPool

    pool = DistributedPool(4)
    yield pool
    pool.close()
