"""What only a real kernel shows: await and display in %%gpuctx, background output routing, interrupts."""

from __future__ import annotations

import queue

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.manager import start_new_kernel  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def kernel():
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        run(kc, "%load_ext gpuctx\nimport gpuctx, threading\ngpuctx.reset()\n"
                "gpuctx.configure(device='cpu', budget='10GB', safety_factor=1.0)")
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def collect(kc, msg_id, until_idle=True):
    """iopub messages of every parent until ``msg_id`` goes idle; returns (all messages, reply)."""
    msgs = []
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        msgs.append(msg)
        if (msg["msg_type"] == "status" and msg["parent_header"].get("msg_id") == msg_id
                and msg["content"]["execution_state"] == "idle"):
            break
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    return msgs, reply


def run(kc, code):
    msg_id = kc.execute(code)
    msgs, reply = collect(kc, msg_id)
    assert reply["content"]["status"] == "ok", reply["content"]
    return msg_id, msgs


def results(msgs, msg_id):
    return [m["content"]["data"]["text/plain"] for m in msgs
            if m["msg_type"] == "execute_result" and m["parent_header"]["msg_id"] == msg_id]


def test_await_and_last_expression_in_a_foreground_cell(kernel):
    _, kc = kernel
    msg_id, msgs = run(kc, "%%gpuctx m --vram 1GB\nimport asyncio\nawait asyncio.sleep(0)\n41 + 1")
    assert results(msgs, msg_id) == ["42"]


def test_exception_in_a_cell_is_an_ordinary_error(kernel):
    _, kc = kernel
    msg_id = kc.execute("%%gpuctx m\nraise ValueError('boom')")
    msgs, reply = collect(kc, msg_id)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "ValueError"
    msg_id, msgs = run(kc, "%%gpuctx m\n'still fine'")
    assert results(msgs, msg_id) == ["'still fine'"]


def test_background_output_goes_to_the_cell_that_started_it(kernel):
    _, kc = kernel
    start_id, _ = run(kc, "go = threading.Event()")
    start_id, _ = run(kc, "%%gpuctx bg --vram 1GB --background --name job\ngo.wait(30)\nprint('from the background')")
    later_id, msgs = run(kc, "go.set(); job.result(30); 'later cell'")
    extra = []
    try:
        while True:
            extra.append(kc.get_iopub_msg(timeout=1))
    except queue.Empty:
        pass
    streams = [m for m in msgs + extra if m["msg_type"] == "stream" and "from the background" in m["content"]["text"]]
    assert streams, "the background print never arrived"
    assert all(m["parent_header"]["msg_id"] == start_id for m in streams)


def test_interrupt_while_waiting_withdraws_the_request(kernel):
    km, kc = kernel
    run(kc, "rel, running = threading.Event(), threading.Event()")
    run(kc, "%%gpuctx busy --vram 1GB --background --name hold\nrunning.set(); rel.wait(30)")
    run(kc, "running.wait(30)")
    msg_id = kc.execute("%%gpuctx busy\n'never'")
    # wait for the note (a display, not stderr: issue 14, entry 23) that the cell is waiting, then interrupt
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["msg_type"] == "display_data" and "waits its turn" in msg["content"]["data"].get("text/plain", ""):
            assert msg["content"]["transient"].get("display_id")
            break
        assert not (msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr"), msg
    km.interrupt_kernel()
    msgs, reply = collect(kc, msg_id)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    check_id, msgs = run(kc, "rel.set(); hold.result(30)\n[t.state.value for t in gpuctx.scheduler().tasks()]")
    assert results(msgs, check_id) == ["[]"]
    ok_id, msgs = run(kc, "%%gpuctx busy\n'after the interrupt'")
    assert results(msgs, ok_id) == ["'after the interrupt'"]
